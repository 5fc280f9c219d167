"""An MCP server's tools as server tools: each listed tool (those `allowed_tools` keeps)
becomes a registry Tool of the pack `mcp:<label>`, so it has everything a Python tool has:
a schema-valid constrained call, the scope `tools:mcp:<label>`, rate limits, a timeout,
the audit log, the tool rails on its arguments and its result, and confirmation when it is
destructive: annotated `destructiveHint: true` by its server (and not read-only), or listed
under the server's `destructive` by the operator.

Its arguments are checked against the server's own input schema (JSON Schema) before the
call; its result is the text the server returned (or its structured content), and a result
the server flags `isError` is an error the model reads, as a ToolError is.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.errors import ConfigError
from server.mcp.config import MCPServerConfig, parse
from server.mcp.connection import (
    MCPConnection,
    MCPUnavailable,
    call_with_headers,
    first_error,
    list_tools,
)
from server.toolcalls.registry import (
    Registry,
    Tool,
    ToolContext,
    ToolError,
    _parse_rate,
    _strip_titles,
)

log = logging.getLogger(__name__)


def _result(result: Any) -> Any:
    """What the model reads of a CallToolResult."""
    texts = [c.text for c in result.content or [] if getattr(c, "type", None) == "text"]
    if result.is_error:
        raise ToolError(" ".join(texts) or "the MCP tool reported an error")
    if texts:
        return "\n".join(texts)
    if result.structured_content is not None:
        return result.structured_content
    return json.dumps([getattr(c, "type", "content") for c in result.content or []])


# The keyword the ToolContext reaches an MCP tool's function by: not a name any server's
# own parameters could have.
_CONTEXT = "__enclave_context"


def as_tool(config: MCPServerConfig, listed: Any, connection: MCPConnection) -> Tool:
    name = listed.name
    annotations = listed.annotations
    read_only = bool(annotations and annotations.read_only_hint)
    annotated = bool(annotations and annotations.destructive_hint) and not read_only
    schema = _strip_titles(listed.input_schema or {"type": "object", "properties": {}})
    schema.setdefault("type", "object")

    async def call(**arguments: Any) -> Any:
        ctx: ToolContext = arguments.pop(_CONTEXT)
        headers = ctx.mcp_headers.get(config.label)
        try:
            if headers:
                result = await call_with_headers(config, dict(headers), name, arguments)
            else:
                result = await connection.call(name, arguments)
        except MCPUnavailable as exc:
            # Our own words on which server failed and how: the model may tell the user.
            raise ToolError(str(exc)) from None
        return _result(result)

    return Tool(
        name=name,
        description=(listed.description or listed.title or name).split("\n\n")[0].replace("\n", " ").strip(),
        fn=call,
        args_model=None,
        parameters=schema,
        context_param=_CONTEXT,
        destructive=annotated or name in config.destructive,
        idempotent=read_only or bool(annotations and annotations.idempotent_hint),
        timeout=config.timeout_s,
        rate_limit=_parse_rate(config.rate_limits.get(name)),
    )


def _listings(configs: list[MCPServerConfig]) -> list[list[Any]]:
    async def every() -> list[list[Any]]:
        return list(await asyncio.gather(*(list_tools(c) for c in configs), return_exceptions=True))

    # Start-up may already run inside an event loop (a test client, an embedding app):
    # the listing gets a loop of its own, in a thread.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, every()).result()


def add_mcp_servers(registry: Registry, configs: list[MCPServerConfig]) -> None:
    """Lists each server's tools (before binding: an unreachable server stops start-up with
    a message naming it) and adds them to the registry as the pack `mcp:<label>`."""
    if not configs:
        return
    configs = parse(configs)  # labels unique: each is a pack and a scope
    for config, listing in zip(configs, _listings(configs), strict=True):
        if isinstance(listing, BaseException):
            raise ConfigError(f"MCP server `{config.label}` could not be reached to list its tools: {first_error(listing)}")
        names = {t.name for t in listing}
        unknown = sorted(set(config.allowed_tools or []) - names) + sorted(set(config.destructive) - names)
        if unknown:
            raise ConfigError(f"MCP server `{config.label}` lists no tool named {', '.join(f'`{n}`' for n in unknown)}")
        kept = [t for t in listing if config.allowed_tools is None or t.name in config.allowed_tools]
        connection = MCPConnection(config, {t.name: t for t in kept})
        registry.add_pack(config.pack, [as_tool(config, t, connection) for t in sorted(kept, key=lambda t: t.name)])
        registry.connections[config.label] = connection
        log.info("MCP server %s: %s", config.label, ", ".join(t.name for t in kept))

