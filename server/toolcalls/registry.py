"""Server-side tools: plain typed Python functions collected from packs in `tools/`.

A pack is a module `tools.<pack>` whose functions carry the @tool decorator. The
docstring is the description the model sees; the JSON schema comes from the signature
through pydantic, so `Annotated[str, Field(pattern=...)]` both documents and constrains
an argument. A parameter typed `ToolContext` is filled in by the server (who is calling,
the conversation, an idempotency key, the tenant's own data) and never shown to the
model. A pack may define `setup(settings)`, run once at start-up (read its options), and
`init_tenant_data(conn, tenant)`, run once per tenant database (server/toolcalls/tenancy.py).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from server.errors import ConfigError, InvalidRequestError
from server.scopes import pack_name, pack_scope
from server.toolcalls.tenancy import PackData, TenantData

log = logging.getLogger(__name__)


class ToolError(Exception):
    """Raised by a tool to report a refusal or failure the model should see as-is."""


@dataclass(frozen=True)
class ToolContext:
    """What the server hands a tool besides its arguments. Frozen: a tool acts for the
    tenant and user the server authenticated, and reaches only that tenant's data."""

    tenant: str
    user: str
    key_id: str | None
    request_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    # Stable across retries and repeated confirmations: tools with side effects use it
    # to make a second execution a no-op.
    idempotency_key: str | None = None
    # The calling tenant's database of the tool's pack; bound by the server per call.
    data: TenantData | None = None
    # Headers the request sends to MCP servers, by label (only those the operator lets a
    # request set: server/mcp/config.py); used for this request's calls, never stored.
    mcp_headers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]
    args_model: type[BaseModel] | None  # None: arguments checked against `parameters` (JSON Schema)
    parameters: dict[str, Any]
    context_param: str | None
    pack: str = ""
    destructive: bool = False
    idempotent: bool = False
    timeout: float = 10.0
    retries: int = 0
    rate_limit: tuple[int, float] | None = None  # (calls, per seconds) per key
    confirm: str | None = None  # summary template for destructive tools, formatted with the arguments
    precheck: Callable[..., Any] | None = None  # runs before asking for confirmation
    # Arguments of typical calls: they document the tool, and the isolation check
    # (server/toolcalls/isolation.py) runs the tool with them.
    examples: list[dict[str, Any]] = field(default_factory=list)
    # Requests a user would make of it, in their words: the shortlist ranks tools by them
    # beside the description (server/toolcalls/shortlist.py).
    asks: list[str] = field(default_factory=list)
    data: PackData | None = None  # the pack's per-tenant databases

    @property
    def scope(self) -> str:
        return pack_scope(self.pack)

    def bind(self, ctx: ToolContext) -> ToolContext:
        """The context this tool runs with: the caller's, with the caller's tenant data."""
        return replace(ctx, data=self.data.for_tenant(ctx.tenant) if self.data is not None else None)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Arguments checked and coerced by the signature (or, for a tool known by its
        schema only, as an MCP server's are, checked against the schema); ToolError on
        failure."""
        if self.args_model is None:
            import jsonschema

            if not isinstance(arguments, dict):
                raise ToolError("invalid arguments: expected an object")
            problems = sorted(jsonschema.Draft202012Validator(self.parameters).iter_errors(arguments), key=lambda e: list(e.path))
            if problems:
                raise ToolError("invalid arguments: " + "; ".join(f"{'.'.join(str(p) for p in e.path) or 'arguments'}: {e.message}" for e in problems))
            return dict(arguments)
        try:
            return dict(self.args_model.model_validate(arguments))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors())
            raise ToolError(f"invalid arguments: {problems}") from None

    def summary(self, arguments: dict[str, Any]) -> str:
        if self.confirm:
            try:
                return self.confirm.format(**arguments)
            except (KeyError, IndexError, ValueError):
                pass
        return f"run {self.name} with {arguments}"

    def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
        kwargs = dict(arguments)
        if self.context_param:
            kwargs[self.context_param] = self.bind(ctx)
        return self.fn(**kwargs)


def _parse_rate(rate: str | None) -> tuple[int, float] | None:
    if rate is None:
        return None
    count, _, unit = rate.partition("/")
    seconds = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}.get(unit.strip())
    if not count.strip().isdigit() or seconds is None:
        raise ConfigError(f"rate limit {rate!r}: write it as N/second|minute|hour|day")
    return int(count), seconds


def _strip_titles(schema: Any) -> Any:
    # pydantic adds a "title" to every node; for the model it is noise in the prompt.
    if isinstance(schema, dict):
        return {k: (_strip_titles_props(v) if k == "properties" else _strip_titles(v)) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def _strip_titles_props(props: dict[str, Any]) -> dict[str, Any]:
    return {name: _strip_titles(sub) for name, sub in props.items()}


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    destructive: bool = False,
    idempotent: bool | None = None,
    timeout: float = 10.0,
    retries: int = 0,
    rate_limit: str | None = None,
    confirm: str | None = None,
    precheck: Callable[..., Any] | None = None,
    examples: list[dict[str, Any]] | None = None,
    asks: list[str] | None = None,
):
    """Mark a function as a tool. Read-only tools are idempotent (and so retried on
    failure when `retries` > 0) unless told otherwise; destructive ones never are."""

    def wrap(f: Callable[..., Any]) -> Tool:
        sig = inspect.signature(f)
        hints = typing.get_type_hints(f, include_extras=True)  # resolves string annotations
        fields: dict[str, Any] = {}
        context_param = None
        for name, param in sig.parameters.items():
            if hints.get(name) is ToolContext:
                context_param = name
                continue
            if name not in hints:
                raise TypeError(f"tool {f.__name__}: parameter {name} needs a type annotation")
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[name] = (hints[name], default)
        model = create_model(f"{f.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        schema = _strip_titles(model.model_json_schema())
        doc = inspect.getdoc(f) or ""
        description = doc.split("\n\n")[0].replace("\n", " ").strip()
        if not description:
            raise TypeError(f"tool {f.__name__}: the docstring is its description and must not be empty")
        for example in examples or []:
            try:
                model.model_validate(example)
            except ValidationError as exc:
                raise TypeError(f"tool {f.__name__}: example {example} does not fit its signature: {exc}") from None
        return Tool(
            name=f.__name__,
            description=description,
            fn=f,
            args_model=model,
            parameters=schema,
            context_param=context_param,
            destructive=destructive,
            idempotent=(not destructive) if idempotent is None else (idempotent and not destructive),
            timeout=timeout,
            retries=retries,
            rate_limit=_parse_rate(rate_limit),
            confirm=confirm,
            precheck=precheck,
            examples=list(examples or []),
            asks=list(asks or []),
        )

    return wrap(fn) if fn is not None else wrap


class Registry:
    """All tools of the packs this deployment enables, by name."""

    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}
        self.packs: dict[str, list[Tool]] = {}
        self.data: dict[str, PackData] = {}
        # Open connections of the MCP servers whose tools are here (server/mcp), by label.
        self.connections: dict[str, Any] = {}

    async def close(self) -> None:
        for connection in self.connections.values():
            await connection.close()

    def add_pack(self, pack: str, tools: list[Tool], data: PackData | None = None) -> None:
        # Copies: the module's own Tool objects stay untouched, so two registries (two
        # apps in one test process) never share a pack's data or rate limits.
        added = [replace(t, pack=pack, data=data) for t in tools]
        for t in added:
            if t.name in self.tools:
                raise ConfigError(f"tool `{t.name}` of pack `{pack}` clashes with pack `{self.tools[t.name].pack}`")
            self.tools[t.name] = t
        self.packs[pack] = added
        if data is not None:
            self.data[pack] = data

    @classmethod
    def load(cls, packs: list[str], settings: Any = None, data_root: Path | None = None) -> Registry:
        """The packs' tools; each pack's tenant databases live under `data_root` (default:
        the settings' pack data directory)."""
        registry = cls()
        if data_root is None and settings is not None:
            data_root = settings.resolved_pack_data_dir
        for ref in packs:
            # "support" is tools/support; a dotted name is any importable module.
            module_name = ref if "." in ref else f"tools.{ref}"
            pack = pack_name(ref)
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise ConfigError(f"ENCLAVE_TOOL_PACKS: tool pack `{ref}` cannot be imported: {exc}") from exc
            found = [v for v in vars(module).values() if isinstance(v, Tool)]
            if not found:
                raise ConfigError(f"ENCLAVE_TOOL_PACKS: `{module_name}` defines no @tool functions")
            if hasattr(module, "setup") and settings is not None:
                module.setup(settings)
            data = PackData(pack, data_root, getattr(module, "init_tenant_data", None)) if data_root is not None else None
            registry.add_pack(pack, sorted(found, key=lambda t: t.name), data)
            log.info("tool pack %s: %s", pack, ", ".join(t.name for t in found))
        for name, rate in (getattr(settings, "tool_rate_limits", None) or {}).items():
            if name not in registry.tools:
                raise ConfigError(f"ENCLAVE_TOOL_RATE_LIMITS: no enabled tool is named `{name}`")
            registry.tools[name].rate_limit = _parse_rate(rate)
        return registry

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name)

    def resolve(self, ref: str, param: str) -> list[Tool]:
        """`pack`, `pack.tool` or `tool` → the tools it names."""
        if ref in self.packs:
            return list(self.packs[ref])
        pack, _, name = ref.rpartition(".")
        found = self.tools.get(name)
        if found is not None and (not pack or found.pack == pack):
            return [found]
        raise InvalidRequestError(f"no server tool or tool pack named `{ref}` is enabled on this server", param=param, code="tool_not_found")
