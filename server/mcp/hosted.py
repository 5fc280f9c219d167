"""OpenAI's `mcp` tool of the Responses API, on the MCP servers the operator configured.

A request's tool `{"type": "mcp", "server_label": …, "allowed_tools": …,
"require_approval": …}` becomes the server tools of that server (the pack `mcp:<label>`),
so its calls run as every server tool's do (scopes, rails, audit). The site is air-gapped
and the operator decides which servers exist: a label that names no configured server, or a
`server_url` other than the configured one, is a 400. `headers` (and `authorization`, a
bearer token) go with this request's calls to that server only where the operator lets a
request set them (`request_headers`); otherwise they are a 400, the operator's
configuration holding the credentials. They are never stored, nor echoed in the response.

`require_approval` (default "always", as OpenAI's) makes calls wait for approval: the
response then carries an `mcp_approval_request` item, whose id is the pending action's; the
next request answers it with an `mcp_approval_response` item. A tool its server annotates
destructive, or the operator marks, waits whatever the request says. The output also carries
an `mcp_list_tools` item per server and an `mcp_call` item per call that ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.errors import InvalidRequestError
from server.ids import new_id

ALLOWED_KEYS = {"type", "server_label", "server_url", "allowed_tools", "require_approval", "headers", "server_description", "authorization", "connector_id"}


@dataclass
class HostedMCP:
    """The MCP servers of one Responses request: their tools, by server label."""

    tools: dict[str, list[Any]] = field(default_factory=dict)  # label → registry Tools offered
    listed: dict[str, Any] = field(default_factory=dict)  # tool name → its server's listing
    list_ids: dict[str, str] = field(default_factory=dict)

    def label_of(self, tool_name: str) -> str | None:
        return next((label for label, tools in self.tools.items() if any(t.name == tool_name for t in tools)), None)

    def list_items(self) -> list[dict[str, Any]]:
        out = []
        for label, tools in self.tools.items():
            item_id = self.list_ids.setdefault(label, new_id("mcp_list_tools"))
            listed = [{"name": t.name, "description": t.description, "input_schema": t.parameters, "annotations": self._annotations(t.name)} for t in tools]
            out.append({"id": item_id, "type": "mcp_list_tools", "server_label": label, "tools": listed, "error": None})
        return out

    def _annotations(self, name: str) -> dict[str, Any] | None:
        """The annotations the server itself listed for a tool (MCP's camelCase)."""
        annotations = getattr(self.listed.get(name), "annotations", None)
        return annotations.model_dump(by_alias=True, exclude_none=True, mode="json") if annotations is not None else None

    def call_items(self, server_calls: list[Any], pending: dict[str, Any] | None) -> list[dict[str, Any]]:
        """An `mcp_call` per call that ran, and the `mcp_approval_request` of a call that
        waits for approval."""
        out = []
        for r in server_calls:
            label = self.label_of(r.name)
            if label is None or r.status == "pending_confirmation":
                continue
            ok = r.status == "ok"
            out.append(
                {
                    "id": "mcp_" + r.call_id.removeprefix("call_"),
                    "type": "mcp_call",
                    "server_label": label,
                    "name": r.name,
                    "arguments": r.arguments,
                    "output": r.content if ok else None,
                    "error": None if ok else _error_text(r.content),
                    "status": "completed" if ok else "failed",
                }
            )
        if pending is not None and pending.get("status") in ("succeeded", "failed") and self.label_of(pending["tool"]) is not None:
            # An approved call ran at the start of this turn.
            ok = pending["status"] == "succeeded"
            result = pending.get("result")
            out.insert(
                0,
                {
                    "id": "mcp_" + pending["id"].removeprefix("act_"),
                    "type": "mcp_call",
                    "server_label": self.label_of(pending["tool"]),
                    "name": pending["tool"],
                    "arguments": json.dumps(pending["arguments"], ensure_ascii=False),
                    "output": (result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)) if ok else None,
                    "error": None if ok else _error_text(json.dumps(result) if result is not None else "failed"),
                    "status": "completed" if ok else "failed",
                    "approval_request_id": pending["id"],
                },
            )
        if pending is not None and pending.get("status") == "pending":
            label = self.label_of(pending["tool"])
            if label is not None:
                out.append(
                    {
                        "id": pending["id"],
                        "type": "mcp_approval_request",
                        "server_label": label,
                        "name": pending["tool"],
                        "arguments": json.dumps(pending["arguments"], ensure_ascii=False),
                    }
                )
        return out


def _error_text(content: str) -> str:
    try:
        return str(json.loads(content).get("error") or content)
    except (ValueError, AttributeError):
        return content


def _names(value: Any, where: str) -> list[str] | None:
    """`allowed_tools` or a `require_approval` filter: a list of names or {"tool_names": [...]}."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("tool_names")
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidRequestError(f"{where} must be a list of tool names or {{\"tool_names\": [...]}}", param=where)
    return value


def chat_tools(entry: dict[str, Any], i: int, registry: Any, hosted: HostedMCP) -> list[dict[str, Any]]:
    """The server-tool entries of one `mcp` tool, checked against what the operator
    configured; its tools are added to `hosted`."""
    where = f"tools.{i}"
    unknown = sorted(set(entry) - ALLOWED_KEYS)
    if unknown:
        raise InvalidRequestError(f"{where}: unknown field(s) of an mcp tool: {', '.join(unknown)}", param=f"{where}.{unknown[0]}")
    label = entry.get("server_label")
    connection = registry.connections.get(label) if registry is not None and isinstance(label, str) else None
    if connection is None:
        raise InvalidRequestError(
            f"{where}: no MCP server labelled {label!r} is configured on this server; only the operator's servers can be used",
            param=f"{where}.server_label",
            code="mcp_server_not_allowed",
        )
    url = entry.get("server_url")
    if url is not None and url != connection.config.url:
        raise InvalidRequestError(
            f"{where}: server_url does not match the MCP server `{label}` the operator configured; other URLs cannot be reached from here",
            param=f"{where}.server_url",
            code="mcp_server_not_allowed",
        )
    if entry.get("connector_id"):
        raise InvalidRequestError(f"{where}: connectors are not available here; use an MCP server the operator configured", param=f"{where}.connector_id", code="unsupported_parameter")
    headers: dict[str, str] = {}
    if entry.get("headers") is not None:
        headers = connection.config.request_headers_from(entry["headers"], f"{where}.headers")
    token = entry.get("authorization")
    if token is not None:  # OpenAI's field for an OAuth access token: a bearer Authorization header
        if not isinstance(token, str) or not token:
            raise InvalidRequestError(f"{where}.authorization must be a non-empty string", param=f"{where}.authorization")
        headers |= connection.config.request_headers_from({"Authorization": f"Bearer {token}"}, f"{where}.authorization")
    offered = {t.name: t for t in registry.packs.get(connection.config.pack, [])}
    allowed = _names(entry.get("allowed_tools"), f"{where}.allowed_tools")
    if allowed is not None:
        missing = [n for n in allowed if n not in offered]
        if missing:
            raise InvalidRequestError(f"{where}: the MCP server `{label}` has no tool {', '.join(map(repr, missing))}", param=f"{where}.allowed_tools", code="tool_not_found")
    names = allowed if allowed is not None else list(offered)
    approval = entry.get("require_approval", "always")
    if approval == "always":
        confirmed = set(names)
    elif approval == "never":
        confirmed = set()
    elif isinstance(approval, dict):
        never = set(_names(approval.get("never"), f"{where}.require_approval.never") or [])
        always = _names(approval.get("always"), f"{where}.require_approval.always")
        confirmed = set(always) if always is not None else set(names) - never
    else:
        raise InvalidRequestError(f'{where}.require_approval must be "always", "never" or a filter', param=f"{where}.require_approval")
    hosted.tools[label] = [offered[n] for n in names]
    hosted.listed.update({n: connection.listed.get(n) for n in names})
    extra = {"headers": headers} if headers else {}
    return [{"type": "server", "name": f"{connection.config.pack}.{n}", "confirm": n in confirmed, **extra} for n in names]


def approval_messages(item: dict[str, Any], where: str) -> list[dict[str, str]]:
    """An `mcp_approval_response` as the conversation the tool loop reads: the action
    named, and the user's answer (server/turn/tool_loop.py resolves it)."""
    action = item.get("approval_request_id")
    if not isinstance(action, str) or not isinstance(item.get("approve"), bool):
        raise InvalidRequestError(f"{where} needs approval_request_id and approve (a boolean)", param=where)
    return [{"role": "assistant", "content": f"(action {action})"}, {"role": "user", "content": "yes" if item["approve"] else "no"}]
