"""enclave serve | models prepare|path|list | keys create|list|scopes|revoke|budget | tools check | traces show | usage | eval"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from server.errors import ConfigError

log = logging.getLogger("enclave")


def _settings(args: argparse.Namespace):
    from server.config import load_settings

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "model", "data_dir", "deployment")}
    if getattr(args, "insecure", False):
        overrides["insecure"] = True
    return load_settings(getattr(args, "config", None), **overrides)


def _logging(level: str) -> None:
    from server.telemetry.redaction import install_log_redaction

    install_log_redaction()
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "debug":
        # NeMo logs every event of every rail at INFO: noise, and time on the hot path.
        logging.getLogger("nemoguardrails").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    settings = _settings(args)
    _logging(settings.log_level)
    from server.auth import KeyStore

    keys = KeyStore(settings.resolved_keys_file)
    if not keys.enabled:
        if not settings.is_loopback and not settings.insecure:
            raise ConfigError(
                f"refusing to listen on {settings.host} without API keys: anyone who can reach it could use it. "
                "Create a key with `enclave keys create --tenant T --user U`, or pass --insecure to accept the risk."
            )
        log.warning("no API keys configured (%s): authentication is off%s", settings.resolved_keys_file,
                    "" if settings.is_loopback else "; --insecure: listening beyond loopback")
    wildcard = [r["id"] for r in keys.list() if not r.get("revoked") and "*" in r.get("scopes", ())]
    if wildcard:
        # Keys made before least privilege: "*" no longer reaches the operator scopes.
        log.info("keys with '*' (every end-user scope and tool pack, no operator scope unless named): %s; "
                 "narrow them with `enclave keys scopes KEY_ID --scope …`", ", ".join(wildcard))
    app = create_app(settings)
    log.info("listening on http://%s:%d/v1 (deployment %s; model %s loads in the background; GET /ready)", settings.host, settings.port, settings.deployment, settings.model)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=5)
    load_error = app.state.runtime.load_error
    if load_error:
        print(f"enclave: error: {load_error}", file=sys.stderr)
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from server.checkpoints import checkpoint_dir, prepare, verify
    from server.profiles import find_profile, load_profiles

    settings = _settings(args)
    if args.action == "list":
        for profile in load_profiles(settings.profiles_dir).values():
            print(f"{profile.name}\t{profile.tier}\t{profile.device}\t{', '.join(profile.aliases)}")
        return 0
    profile = find_profile(settings.profiles_dir, args.name or settings.model)
    if args.action == "path":
        print(checkpoint_dir(profile, settings.models_dir))
        return 0
    if args.action == "verify":
        print(verify(profile, settings.models_dir))
        return 0
    _logging("info")
    print(prepare(profile, settings.models_dir, force=args.force))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from server.auth import KeyStore
    from server.scopes import default_scopes, unknown

    settings = _settings(args)
    store = KeyStore(settings.resolved_keys_file)
    typos = unknown(args.scope or [])
    if typos:
        raise ConfigError(f"unknown scope(s): {', '.join(typos)} (see the README's table of scopes)")
    if args.action == "create":
        if not args.tenant or not args.user:
            raise ConfigError("keys create needs --tenant and --user")
        # Least privilege: without --scope, an end user's scopes and the enabled tool packs.
        scopes = args.scope or default_scopes([*settings.tool_packs, *(c.pack for c in settings.mcp_servers)])
        secret, record = store.create(args.tenant, args.user, scopes, args.vector_store, args.budget_usd)
        print(json.dumps({**record, "key": secret}, indent=2))
        print("Store the key now: it is not shown again.", file=sys.stderr)
    elif args.action == "list":
        print(json.dumps(store.list(), indent=2))
    elif args.action == "scopes":
        if not args.scope:
            raise ConfigError("keys scopes needs the new scopes: --scope S (repeatable)")
        if not store.set_scopes(args.key_id or "", args.scope):
            raise ConfigError(f"no active key with id {args.key_id!r}")
        print(f"scopes of {args.key_id}: {', '.join(dict.fromkeys(args.scope))}")
    elif args.action == "budget":
        if not store.set_budget(args.key_id or "", None if args.budget_usd is None or args.budget_usd < 0 else args.budget_usd):
            raise ConfigError(f"no active key with id {args.key_id!r}")
        print(f"budget of {args.key_id}: {'none' if args.budget_usd is None or args.budget_usd < 0 else f'${args.budget_usd}'}")
    elif args.action == "revoke":
        if not store.revoke(args.key_id or ""):
            raise ConfigError(f"no active key with id {args.key_id!r}")
        print(f"revoked {args.key_id}")
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    """Read a trace from the local store: no server needed (an air-gapped operator's view)."""
    from server.db import connect
    from server.telemetry.tracing import TraceStore, render_tree, trace_object

    settings = _settings(args)
    spans = TraceStore(connect(settings.resolved_database_url)).get(args.trace_id.lower())
    if not spans:
        raise ConfigError(f"no trace with id {args.trace_id!r} in {settings.resolved_database_url.split('///')[-1]}")
    if args.json:
        print(json.dumps(trace_object(args.trace_id.lower(), spans), indent=2))
    else:
        print(f"trace {args.trace_id.lower()}")
        print(render_tree(spans))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from server.db import connect
    from server.telemetry.cost import UsageLedger

    settings = _settings(args)
    print(json.dumps(UsageLedger(connect(settings.resolved_database_url)).summary(args.group_by, args.tenant), indent=2))
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """`db upgrade` migrates the schema to the newest revision (servers also do it when
    they start); `db current` says where the database is without changing it."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from server import migrate
    from server.db import connect

    url = _settings(args).resolved_database_url
    try:
        engine = connect(url) if args.action == "upgrade" else create_engine(url)
        print(json.dumps({"current": migrate.current(engine), "head": migrate.head()}))
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot use the database (ENCLAVE_DATABASE_URL): {exc.__class__.__name__}: {exc.orig if hasattr(exc, 'orig') else exc}") from None
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from evals.runner import main as eval_main

    return eval_main(args)


def cmd_ingest(args: argparse.Namespace) -> int:
    from server.ingest import ingest_directory

    return ingest_directory(args.directory, args.store, args.url, args.api_key, prune=args.prune)


def cmd_demo(args: argparse.Namespace) -> int:
    """`demo reset`: the customer-support pack's records of each tenant (or one) back to
    what its seed gives them."""
    from server.toolcalls.registry import Registry
    from tools import support

    settings = _settings(args)
    data = Registry.load(["support"], settings).data["support"]
    tenants = [args.tenant] if args.tenant else data.tenants()
    for tenant in tenants:
        with data.connect(tenant) as conn:
            support.reset_tenant_data(conn, tenant)
    print(f"support demo data re-seeded for {len(tenants)} tenant(s): {', '.join(tenants) or 'none yet'}")
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    """`tools check`: the tenant-isolation check over the enabled packs (or those named),
    on throw-away databases; exits 1 on any finding."""
    from server.toolcalls.isolation import check_packs

    settings = _settings(args)
    packs = args.pack or settings.tool_packs
    findings = check_packs(packs, settings)
    for finding in findings:
        print(finding)
    print(f"{len(findings)} finding(s) over {len(packs)} pack(s): {', '.join(packs)}")
    return 1 if findings else 0


def build_parser() -> argparse.ArgumentParser:
    from server.telemetry.cost import GROUPS

    parser = argparse.ArgumentParser(prog="enclave", description="Self-hosted OpenAI-compatible assistant server.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML settings file (keys as in ENCLAVE_* without the prefix)")
    common.add_argument("--data-dir", type=Path, help="state directory (ENCLAVE_DATA_DIR)")
    common.add_argument("--deployment", help="what the server is for: general (default), support, or your own (ENCLAVE_DEPLOYMENT)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="start the API server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="model profile name or alias")
    serve.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without API keys")
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", parents=[common], help="model profiles and checkpoints")
    models.add_argument("action", choices=["prepare", "path", "verify", "list"])
    models.add_argument("name", nargs="?", help="profile name or alias (default: the configured model)")
    models.add_argument("--force", action="store_true", help="prepare again even if a valid checkpoint exists")
    models.set_defaults(func=cmd_models)

    keys = sub.add_parser("keys", parents=[common], help="API keys")
    keys.add_argument("action", choices=["create", "list", "scopes", "revoke", "budget"])
    keys.add_argument("key_id", nargs="?", help="key id, for scopes, revoke and budget")
    keys.add_argument("--tenant")
    keys.add_argument("--user")
    keys.add_argument(
        "--scope", action="append",
        help="repeatable; default: an end user's scopes (chat, embeddings, models, knowledge, memory, usage, tools:<each enabled pack>)",
    )
    keys.add_argument("--vector-store", action="append", help="repeatable; knowledge retrieved for this key's chat completions")
    keys.add_argument("--budget-usd", type=float, help="most this key may spend on engine time (USD); for budget, a negative value removes it")
    keys.set_defaults(func=cmd_keys)

    traces = sub.add_parser("traces", parents=[common], help="traces kept in the local store")
    traces.add_argument("action", choices=["show"])
    traces.add_argument("trace_id")
    traces.add_argument("--json", action="store_true", help="the API's JSON instead of a tree")
    traces.set_defaults(func=cmd_traces)

    usage = sub.add_parser("usage", parents=[common], help="usage and cost from the local store")
    usage.add_argument("--group-by", default="tenant", choices=list(GROUPS))
    usage.add_argument("--tenant", help="only this tenant")
    usage.set_defaults(func=cmd_usage)

    db = sub.add_parser("db", parents=[common], help="the relational schema (ENCLAVE_DATABASE_URL)")
    db.add_argument("action", choices=["upgrade", "current"])
    db.set_defaults(func=cmd_db)

    from evals.runner import add_arguments

    add_arguments(sub.add_parser("eval", help="run the offline eval suite against a server (any base URL)"))
    sub.choices["eval"].set_defaults(func=cmd_eval)

    ingest = sub.add_parser("ingest", help="load a directory of documents into a vector store of a running server")
    ingest.add_argument("directory", type=Path)
    ingest.add_argument("--store", required=True, help="vector store name (created if missing)")
    ingest.add_argument("--url", default=os.environ.get("ENCLAVE_URL", "http://127.0.0.1:8000/v1"), help="server base URL (ENCLAVE_URL)")
    ingest.add_argument("--api-key", default=os.environ.get("ENCLAVE_API_KEY"), help="API key with the knowledge scope (ENCLAVE_API_KEY)")
    ingest.add_argument("--prune", action="store_true", help="remove files from the store that are no longer in the directory")
    ingest.set_defaults(func=cmd_ingest)

    tools = sub.add_parser("tools", parents=[common], help="server-side tool packs")
    tools.add_argument("action", choices=["check"])
    tools.add_argument("--pack", action="append", help="repeatable; default: the enabled packs (ENCLAVE_TOOL_PACKS)")
    tools.set_defaults(func=cmd_tools)

    demo = sub.add_parser("demo", parents=[common], help="demo data of the customer-support tool pack")
    demo.add_argument("action", choices=["reset"])
    demo.add_argument("--tenant", help="only this tenant (default: every tenant that has support data)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"enclave: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # vLLM spawns its engine core: the guard keeps the child from re-running main
    sys.exit(main())
