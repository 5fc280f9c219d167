"""Which tools a request offers and how the model may use them (`tools`, `tool_choice`).

Client tools (`{"type": "function", ...}`) are OpenAI's: the server only constrains the
call and hands it back. Server tools (`{"type": "server", "name": "support"}` for a whole
pack, or `"support.lookup_ticket"` / `"lookup_ticket"` for one tool) come from the
registry and run here; `"confirm": true` on such an entry makes its tools wait for the
user's confirmation as destructive ones do (a request may ask for more care, never less).
An entry naming an MCP server's tools may carry `"headers"` for that server, those its
operator lets a request set (`request_headers`): they go with this request's calls only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from server.errors import InvalidRequestError, PermissionDeniedError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    server: bool = False
    asks: tuple[str, ...] = ()  # example requests it answers (packs declare them): for the shortlist


@dataclass
class ToolPlan:
    """The tools of one request and the caller's `tool_choice`."""

    tools: list[ToolSpec]
    choice: Literal["none", "auto", "required"] | str  # a str other than those: a named tool
    parallel: bool = True
    by_name: dict[str, ToolSpec] = field(default_factory=dict)
    # Server tools this request wants confirmed before they run, beyond the destructive
    # ones (a server entry's `"confirm": true`; the Responses API's MCP `require_approval`).
    confirm: frozenset[str] = frozenset()
    # Headers for MCP servers' calls, by server label (a server entry's `"headers"`).
    mcp_headers: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.tools}

    @property
    def has_server_tools(self) -> bool:
        return any(t.server for t in self.tools)

    def step_choice(self, step: int) -> str:
        """The choice for a step of the server-side loop: a forced call binds the first
        step only, otherwise the loop would call the same tool for ever."""
        if step == 0 or self.choice in ("none", "auto"):
            return self.choice
        return "auto"


def _function_tool(entry: dict[str, Any], i: int) -> ToolSpec:
    fn = entry.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError(f"tools[{i}].function.name is required", param=f"tools[{i}].function")
    name = fn["name"]
    if not _NAME.match(name):
        raise InvalidRequestError(
            f"tools[{i}].function.name {name!r} must be 1-64 characters of letters, digits, _ or -",
            param=f"tools[{i}].function.name",
        )
    params = fn.get("parameters") or EMPTY_PARAMETERS
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise InvalidRequestError(
            f"tool `{name}`: parameters must be a JSON schema of type object", param=f"tools[{i}].function.parameters", code="invalid_tool_schema"
        )
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequestError(f"tools[{i}].function.description must be a string", param=f"tools[{i}].function.description")
    return ToolSpec(name, description, params)


def declares_server_tools(tools: list[dict[str, Any]] | None) -> bool:
    """Whether a request names server tools, before it is validated: such a turn is
    several model calls (its budget hold covers them all)."""
    return any(isinstance(t, dict) and t.get("type") == "server" for t in tools or [])


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None, registry: Any, principal: Any) -> ToolPlan | None:
    """Validate `tools` and `tool_choice`; None when the request uses no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice is only allowed when tools are specified", param="tool_choice")
        return None
    specs: list[ToolSpec] = []
    confirm: set[str] = set()
    mcp_headers: dict[str, dict[str, str]] = {}
    for i, entry in enumerate(tools):
        if not isinstance(entry, dict):
            raise InvalidRequestError(f"tools[{i}] must be an object", param=f"tools[{i}]")
        kind = entry.get("type")
        if kind == "function":
            specs.append(_function_tool(entry, i))
        elif kind == "server":
            ref = entry.get("name")
            if not isinstance(ref, str) or registry is None:
                raise InvalidRequestError(f"tools[{i}]: a server tool needs a name", param=f"tools[{i}].name")
            resolved = registry.resolve(ref, param=f"tools[{i}].name")
            for tool in resolved:
                if not principal.allows(tool.scope):
                    raise PermissionDeniedError(
                        f"this API key may not use the server tool `{tool.name}` (needs scope `{tool.scope}`)",
                        param=f"tools[{i}]",
                        code="tool_not_permitted",
                    )
                specs.append(ToolSpec(tool.name, tool.description, tool.parameters, server=True, asks=tuple(tool.asks)))
                if entry.get("confirm") is True:
                    confirm.add(tool.name)
            if entry.get("headers") is not None:
                packs = {tool.pack for tool in resolved}
                label = packs.pop().removeprefix("mcp:") if len(packs) == 1 and next(iter(packs)).startswith("mcp:") else None
                connection = registry.connections.get(label) if label is not None else None
                if connection is None:
                    raise InvalidRequestError(f"tools[{i}]: headers are only for an MCP server's tools", param=f"tools[{i}].headers")
                mcp_headers[label] = connection.config.request_headers_from(entry["headers"], f"tools[{i}].headers")
        else:
            raise InvalidRequestError(f"tools[{i}].type must be 'function' or 'server', not {kind!r}", param=f"tools[{i}].type")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise InvalidRequestError(f"tool `{spec.name}` is declared more than once", param="tools")
        seen.add(spec.name)
    return ToolPlan(specs, _choice(tool_choice, seen), parallel is not False, confirm=frozenset(confirm), mcp_headers=mcp_headers)


def _choice(tool_choice: Any, names: set[str]) -> str:
    if tool_choice is None:
        return "auto"
    if tool_choice in ("none", "auto", "required"):
        return tool_choice
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") == "function" and isinstance(name, str):
            if name not in names:
                raise InvalidRequestError(f"tool_choice names `{name}`, which is not in tools", param="tool_choice")
            return name
    raise InvalidRequestError(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}', param="tool_choice"
    )
