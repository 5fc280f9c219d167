"""The Responses API: a turn's events as one `response` object, or as the typed event
stream (response.created … output items … response.completed | incomplete | failed)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from server.errors import EnclaveError
from server.turn.encoders.responses_shape import ResponseShape
from server.turn.encoders.sse import sse
from server.turn.events import Choice, Kind, TurnEvent, first_event
from server.turn.pipeline import ChatServing, TurnRun
from server.turn.state import Turn


def final(chat: ChatServing, turn: Turn, shape: ResponseShape, output: list[dict[str, Any]], usage: Any, finish: str | None) -> dict[str, Any]:
    """The finished response object, as returned, streamed last and stored."""
    # No cost here: it is settled after the response is stored, and the stored object
    # must equal the returned one (GET /v1/usage and the trace carry it).
    shape.extensions = {k: v for k, v in chat.extensions(turn).items() if k != "cost"}
    return shape.response("completed", output, usage, finish)


async def complete(chat: ChatServing, turn: Turn, shape: ResponseShape) -> dict[str, Any]:
    run = chat.run(turn)
    answer = Choice()
    try:
        async for ev in run.events:
            answer.add(ev)
    finally:
        await run.aclose()
    return final(chat, turn, shape, shape.output(answer), chat.usage(run.progress), answer.finish_reason)


async def open_stream(chat: ChatServing, turn: Turn, shape: ResponseShape) -> AsyncIterator[str]:
    """Start generating; errors before the first event raise (a normal HTTP error)."""
    run = chat.run(turn)
    return sse(run, await first_event(run.events), _EventEncoder(chat, run, shape))


class _EventEncoder:
    trailer = None

    def __init__(self, chat: ChatServing, run: TurnRun, shape: ResponseShape):
        self.chat = chat
        self.run = run
        self.shape = shape
        self.seq = 0
        self.answer = Choice()
        self.items: list[dict[str, Any]] = []  # output items as they open
        self.open_kind: str | None = None  # "message" | "call"

    def emit(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def opening(self) -> Iterable[str]:
        shape = self.shape
        yield self.emit("response.created", response=shape.response("in_progress", []))
        yield self.emit("response.in_progress", response=shape.response("in_progress", []))
        fs = shape.file_search_item()
        if fs is not None:
            self.items.append(fs)
            yield self.emit("response.output_item.added", output_index=0, item={**fs, "status": "in_progress"})
            yield self.emit("response.file_search_call.completed", output_index=0, item_id=shape.fs_id)
            yield self.emit("response.output_item.done", output_index=0, item=fs)
        yield from self._mcp(shape.hosted.list_items())

    def _mcp(self, items: list[dict[str, Any]]) -> Iterable[str]:
        """MCP items not yet sent (the server's tool list; calls that ran, approvals asked
        for), each added and done at once: they are complete when known."""
        sent = {i.get("id") for i in self.items}
        for item in items:
            if item["id"] in sent:
                continue
            self.items.append(item)
            index = len(self.items) - 1
            yield self.emit("response.output_item.added", output_index=index, item=item)
            if item["type"] == "mcp_list_tools":
                yield self.emit("response.mcp_list_tools.completed", item_id=item["id"], output_index=index)
            elif item["type"] == "mcp_call":
                yield self.emit("response.mcp_call.completed" if item["status"] == "completed" else "response.mcp_call.failed", item_id=item["id"], output_index=index)
            yield self.emit("response.output_item.done", output_index=index, item=item)

    def _open(self, kind: str, item: dict[str, Any]) -> Iterable[str]:
        yield from self._close_open()
        self.items.append(item)
        self.open_kind = kind
        yield self.emit("response.output_item.added", output_index=len(self.items) - 1, item=item)

    def frames(self, ev: TurnEvent) -> Iterable[str]:
        shape, answer = self.shape, self.answer
        index = len(self.items) - 1
        if ev.kind is Kind.TEXT and ev.text:
            if self.open_kind != "message":
                yield from self._close_open()
                yield from self._mcp([i for i in shape.mcp_items() if i["type"] == "mcp_call"])  # the calls that ran before this answer
                yield from self._open("message", shape.message_item("", "in_progress"))
                index = len(self.items) - 1
                yield self.emit("response.content_part.added", item_id=shape.msg_id, output_index=index, content_index=0, part={"type": "output_text", "text": "", "annotations": []})
            answer.add(ev)
            yield self.emit("response.output_text.delta", item_id=shape.msg_id, output_index=index, content_index=0, delta=ev.text, logprobs=[])
        elif ev.kind is Kind.CALL:
            answer.add(ev)
            k = len(answer.calls) - 1
            yield from self._open("call", shape.call_item(k, answer.calls[k], "in_progress"))
        elif ev.kind is Kind.ARGS:
            answer.add(ev)
            yield self.emit("response.function_call_arguments.delta", item_id=shape.call_item_id(ev.call), output_index=index, delta=ev.text)
        elif ev.kind is Kind.FINISH:
            answer.add(ev)

    def _close_open(self) -> Iterable[str]:
        shape, answer, items = self.shape, self.answer, self.items
        index = len(items) - 1
        if self.open_kind == "message":
            part = {"type": "output_text", "text": answer.text, "annotations": shape.annotations(answer.text), "logprobs": []}
            yield self.emit("response.output_text.done", item_id=shape.msg_id, output_index=index, content_index=0, text=answer.text, logprobs=[])
            yield self.emit("response.content_part.done", item_id=shape.msg_id, output_index=index, content_index=0, part=part)
            # Cut at max_output_tokens or withheld by a rail: the item is incomplete, as in
            # the final response.
            cut = answer.finish_reason in ("length", "content_filter")
            items[index] = shape.message_item(answer.text, "incomplete" if cut else "completed")
            yield self.emit("response.output_item.done", output_index=index, item=items[index])
        elif self.open_kind == "call":
            k = len(answer.calls) - 1
            call = answer.calls[k]
            yield self.emit("response.function_call_arguments.done", item_id=shape.call_item_id(k), output_index=index, arguments=call["arguments"])
            items[index] = shape.call_item(k, call)
            yield self.emit("response.output_item.done", output_index=index, item=items[index])
        self.open_kind = None

    def closing(self) -> Iterable[str]:
        yield from self._close_open()
        yield from self._mcp(self.shape.mcp_items())
        if not any(i["type"] == "message" for i in self.items) and not self.answer.calls:
            self.items.append(self.shape.message_item(""))  # an empty answer is still a message
        done = final(self.chat, self.run.turn, self.shape, self.items, self.chat.usage(self.run.progress), self.answer.finish_reason)
        # The terminal event names the outcome: response.incomplete for a truncated or
        # deflected answer (the OpenAI Agents SDK keys on it), else response.completed.
        yield self.emit("response.incomplete" if done["status"] == "incomplete" else "response.completed", response=done)

    def failed(self, exc: EnclaveError) -> Iterable[str]:
        detail = exc.to_body()["error"]
        yield self.emit("error", code=detail.get("code"), message=detail.get("message"), param=detail.get("param"))
        for item in self.items:
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"
        error = {"code": detail.get("code") or "server_error", "message": detail.get("message")}
        yield self.emit("response.failed", response=self.shape.response("failed", self.items, self.chat.usage(self.run.progress), error=error))
