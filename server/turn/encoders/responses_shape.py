"""The Responses API's objects: one response's ids, items and the ResponseResource with
every field the Open Responses spec requires, shared by the stream and the stored object."""

from __future__ import annotations

import re
import time
from typing import Any

from server.ids import new_id
from server.mcp.hosted import HostedMCP
from server.memory.context import ContextRequest
from server.protocol import ResponsesRequest
from server.turn.events import Choice
from server.turn.state import Report

_CITE = re.compile(r"\[(\d{1,2})\]")


def _echoed_tool(tool: Any) -> Any:
    """A request's tool as the response echoes it: function tools with every field the
    spec requires. `strict` defaults to true, as in OpenAI's Responses API; the server
    constrains arguments to the schema either way. An `mcp` tool's credentials (`headers`,
    `authorization`) are not echoed: the response is stored."""
    if isinstance(tool, dict) and tool.get("type") == "function":
        return {"type": "function", "name": tool.get("name"), "description": tool.get("description"), "parameters": tool.get("parameters"), "strict": tool.get("strict", True)}
    if isinstance(tool, dict) and tool.get("type") == "mcp":
        return {k: v for k, v in tool.items() if k not in ("headers", "authorization")}
    return tool


class ResponseShape:
    """Ids and objects of one response, shared by the stream and the stored object."""

    def __init__(self, req: ResponsesRequest, ctx: ContextRequest, response_id: str, model: str, hosted: HostedMCP | None = None, report: Report | None = None):
        self.req = req
        # The request's MCP servers and the turn's report (server calls, pending action):
        # the mcp_* output items.
        self.hosted = hosted or HostedMCP()
        self.report = report
        self.ctx = ctx
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        # Set when the response is first shaped as finished: the stored object and the
        # returned one are shaped separately and must agree even across a second boundary.
        self.completed_at: int | None = None
        self.msg_id = new_id("message")
        self.fs_id = new_id("file_search_call")
        self.call_ids: list[str] = []
        self.extensions: dict[str, Any] = {}

    def call_item_id(self, k: int) -> str:
        while len(self.call_ids) <= k:
            self.call_ids.append(new_id("function_call"))
        return self.call_ids[k]

    def file_search_item(self) -> dict[str, Any] | None:
        if not self.ctx.vector_store_ids:
            return None
        with_results = "file_search_call.results" in (self.req.include or [])
        return {
            "id": self.fs_id,
            "type": "file_search_call",
            "status": "completed",
            "queries": [self.ctx.query],
            "results": [
                {"file_id": h.file_id, "filename": h.filename, "score": round(h.score, 6), "text": h.text, "attributes": {"chunk_index": h.chunk_index}}
                for h in self.ctx.sources
            ]
            if with_results
            else None,
        }

    def annotations(self, text: str) -> list[dict[str, Any]]:
        out, seen = [], set()
        for match in _CITE.finditer(text):
            n = int(match.group(1))
            if 1 <= n <= len(self.ctx.sources) and n not in seen:
                seen.add(n)
                hit = self.ctx.sources[n - 1]
                out.append({"type": "file_citation", "file_id": hit.file_id, "filename": hit.filename, "index": match.end()})
        return out

    def message_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": self.annotations(text), "logprobs": []}] if status != "in_progress" else []
        return {"id": self.msg_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def call_item(self, k: int, call: dict[str, str], status: str = "completed") -> dict[str, Any]:
        return {
            "id": self.call_item_id(k),
            "type": "function_call",
            "status": status,
            "call_id": call["id"],
            "name": call["name"],
            "arguments": call["arguments"] if status == "completed" else "",
        }

    def mcp_items(self) -> list[dict[str, Any]]:
        """The `mcp_call` and `mcp_approval_request` items of the turn so far."""
        if not self.hosted.tools or self.report is None:
            return []
        return self.hosted.call_items(self.report.server_calls, self.report.pending_action)

    def output(self, out: Choice) -> list[dict[str, Any]]:
        mcp = self.mcp_items()
        items = [x for x in [self.file_search_item()] if x] + self.hosted.list_items() + [i for i in mcp if i["type"] == "mcp_call"]
        if out.text or not out.calls:
            items.append(self.message_item(out.text))
        items.extend(self.call_item(k, c) for k, c in enumerate(out.calls))
        return items + [i for i in mcp if i["type"] != "mcp_call"]

    def response(
        self, status: str, output: list[dict[str, Any]], usage: Any = None, finish: str | None = None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The ResponseResource, with every field the Open Responses spec requires, in
        every state (in_progress, completed, incomplete, failed)."""
        req = self.req
        incomplete = None
        if finish == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        elif finish == "content_filter":
            status, incomplete = "incomplete", {"reason": "content_filter"}
        if incomplete is not None:
            # The answer that was cut short or withheld is an incomplete item too.
            output = [{**i, "status": "incomplete"} if i.get("type") == "message" else i for i in output]
        if status in ("completed", "incomplete") and self.completed_at is None:
            self.completed_at = int(time.time())
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "completed_at": self.completed_at if status in ("completed", "incomplete") else None,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [_echoed_tool(t) for t in req.tools or []],
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            "top_logprobs": req.top_logprobs or 0,
            "reasoning": req.reasoning,
            "max_tool_calls": req.max_tool_calls,
            "truncation": req.truncation or "disabled",
            "usage": None,
            "user": req.user,
            "metadata": req.metadata or {},
            "store": req.store,
            "background": False,
            "service_tier": "default",
            "safety_identifier": req.safety_identifier,
            "prompt_cache_key": req.prompt_cache_key,
            "conversation": {"id": self.ctx.thread.conversation_id} if self.ctx.thread else None,
        }
        if usage is not None:
            body["usage"] = {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
            }
        # --- extensions: the same as chat completions' (see protocol.ChatCompletion);
        # the conversation is already in OpenAI's own `conversation` field.
        body.update({k: v for k, v in self.extensions.items() if k != "conversation"})
        return body
