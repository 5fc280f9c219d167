"""The Responses API on top of the chat pipeline.

A Responses request becomes a chat request (sampling, function tools, text format) plus a
ContextRequest (the conversation to continue, whether to store, the vector stores of a
`file_search` tool); ChatServing runs the turn exactly as for chat completions, and
this module shapes its events into a `response` object or the typed event stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from server.auth import Principal
from server.errors import EnclaveError, InvalidRequestError
from server.memory.context import ContextRequest
from server.protocol import ChatCompletionRequest, ResponsesRequest
from server.telemetry.redaction import mask_pii
from server.toolcalls.format import call_text
from server.turn import ChatServing, Turn, TurnOutput, first_event

_CITE = re.compile(r"\[(\d{1,2})\]")
DEFAULT_MAX_RESULTS = 4


def _hex() -> str:
    return secrets.token_hex(12)


# ---------------------------------------------------------------- request mapping


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequestError(
                f"{where}.content[{j}] is of type {kind!r}; this model accepts text parts only",
                param=f"{where}.content.{j}",
                code="unsupported_content",
            )
        texts.append(part["text"])
    return "".join(texts)


def input_messages(req: ResponsesRequest) -> tuple[list[dict[str, str]], list[dict[str, Any]], str]:
    """(chat messages of the new input, the input items as stored, system text found in the input)."""
    if isinstance(req.input, str):
        if not req.input.strip():
            raise InvalidRequestError("input must not be empty", param="input")
        items: list[dict[str, Any]] = [{"type": "message", "role": "user", "content": req.input}]
    else:
        items = list(req.input)
        if not items:
            raise InvalidRequestError("input must not be empty", param="input")
    messages: list[dict[str, str]] = []
    system: list[str] = []
    stored: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", param=f"input.{i}")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"{where}.role must be user, assistant, system or developer", param=f"input.{i}.role")
            text = _text_of(item.get("content"), where)
            if role in ("system", "developer"):
                system.append(text)
            else:
                messages.append({"role": role, "content": text})
            stored.append({"id": item.get("id") or f"msg_{_hex()}", "type": "message", "role": role, "content": [{"type": "input_text" if role != "assistant" else "output_text", "text": text}]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise InvalidRequestError(f"{where} needs call_id and output (a string)", param=f"input.{i}")
            messages.append({"role": "tool", "content": output})
            stored.append({"id": item.get("id") or f"fco_{_hex()}", "type": "function_call_output", "call_id": item["call_id"], "output": output})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments"), str):
                raise InvalidRequestError(f"{where} needs name and arguments (a JSON string)", param=f"input.{i}")
            messages.append({"role": "assistant", "content": call_text([{"function": {"name": item["name"], "arguments": item["arguments"]}}])})
            stored.append({k: item.get(k) for k in ("type", "id", "call_id", "name", "arguments")})
        else:
            raise InvalidRequestError(f"{where}: input items of type {kind!r} are not supported", param=f"input.{i}.type", code="unsupported_input")
    if not messages:
        raise InvalidRequestError("input needs at least one user, assistant or tool item", param="input")
    return messages, stored, "\n\n".join(system)


def _masked_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items with personal data masked in their text (the guardrails mask the
    messages the model sees; the stored items must not keep what they removed)."""
    out = []
    for item in items:
        item = dict(item)
        if isinstance(item.get("content"), list):
            item["content"] = [{**part, "text": mask_pii(part["text"])[0]} if isinstance(part.get("text"), str) else part for part in item["content"]]
        if isinstance(item.get("output"), str):
            item["output"] = mask_pii(item["output"])[0]
        out.append(item)
    return out


def split_tools(req: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any, list[str], int]:
    """(chat tools, chat tool_choice, file_search vector store ids, max results)."""
    chat_tools: list[dict[str, Any]] = []
    stores: list[str] = []
    max_results = DEFAULT_MAX_RESULTS
    for i, tool in enumerate(req.tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
            chat_tools.append({"type": "function", "function": fn})
        elif kind == "file_search":
            ids = tool.get("vector_store_ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(x, str) for x in ids):
                raise InvalidRequestError("file_search needs vector_store_ids, a non-empty list of ids", param=f"tools.{i}.vector_store_ids")
            stores.extend(x for x in ids if x not in stores)
            n = tool.get("max_num_results", DEFAULT_MAX_RESULTS)
            if not isinstance(n, int) or not 1 <= n <= 50:
                raise InvalidRequestError("max_num_results must be an integer from 1 to 50", param=f"tools.{i}.max_num_results")
            max_results = n
        elif kind == "server":
            chat_tools.append(tool)
        else:
            raise InvalidRequestError(f"tools[{i}]: tools of type {kind!r} are not supported", param=f"tools.{i}.type", code="unsupported_tool")
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        elif choice.get("type") == "file_search":
            choice = None  # retrieval runs before every turn that has the tool anyway
    if not chat_tools and choice in ("auto", "none"):
        choice = None
    return chat_tools or None, choice, stores, max_results


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not fmt:
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}}
    return {"type": fmt.get("type")}


def chat_request(req: ResponsesRequest, tools: list[dict[str, Any]] | None, tool_choice: Any) -> ChatCompletionRequest:
    fields: dict[str, Any] = {
        "model": req.model,
        # The stateful path assembles the messages itself; the request needs one to be valid.
        "messages": [{"role": "user", "content": ""}],
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "max_completion_tokens": req.max_output_tokens,
        "response_format": _response_format(req.text),
    }
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid request: {exc}", param="text") from None


# ---------------------------------------------------------------- response shaping


def _echoed_tool(tool: Any) -> Any:
    """A request's tool as the response echoes it: function tools with every field the
    spec requires. `strict` defaults to true, as in OpenAI's Responses API; the server
    constrains arguments to the schema either way."""
    if isinstance(tool, dict) and tool.get("type") == "function":
        return {"type": "function", "name": tool.get("name"), "description": tool.get("description"), "parameters": tool.get("parameters"), "strict": tool.get("strict", True)}
    return tool


class _Shape:
    """Ids and objects of one response, shared by the stream and the stored object."""

    def __init__(self, req: ResponsesRequest, ctx: ContextRequest, response_id: str, model: str):
        self.req = req
        self.ctx = ctx
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.msg_id = f"msg_{_hex()}"
        self.fs_id = f"fs_{_hex()}"
        self.call_ids: list[str] = []
        self.extensions: dict[str, Any] = {}

    def call_item_id(self, k: int) -> str:
        while len(self.call_ids) <= k:
            self.call_ids.append(f"fc_{_hex()}")
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

    def output(self, out: TurnOutput) -> list[dict[str, Any]]:
        items = [x for x in [self.file_search_item()] if x]
        if out.text or not out.calls:
            items.append(self.message_item(out.text))
        items.extend(self.call_item(k, c) for k, c in enumerate(out.calls))
        return items

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
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
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


class ResponsesServing:
    def __init__(self, chat: ChatServing):
        self.chat = chat

    async def prepare(self, req: ResponsesRequest, started: float, principal: Principal) -> tuple[Turn, _Shape]:
        memory = self.chat.memory
        if memory is None:
            raise InvalidRequestError("the Responses API needs the memory services, which are not enabled")
        new_messages, input_items, system_in_input = input_messages(req)
        tools, tool_choice, stores, max_results = split_tools(req)
        request = chat_request(req, tools, tool_choice)
        conversation = req.conversation_name()
        thread = None
        if req.store or req.previous_response_id or conversation:
            thread = await asyncio.to_thread(
                memory.conversations.thread, principal, conversation=conversation, previous_response_id=req.previous_response_id
            )
        instructions = "\n\n".join(x for x in [req.instructions or "", system_in_input] if x)
        ctx = ContextRequest(instructions, new_messages, thread, store=req.store, vector_store_ids=stores, max_results=max_results)
        response_id = f"resp_{_hex()}"
        turn = await self.chat.prepare_stateful(request, started, principal, ctx, request_id=response_id)
        if self.chat.guard is not None:
            input_items = _masked_items(input_items)  # personal data masked, as the model saw it
        shape = _Shape(req, ctx, response_id, self.chat.model)

        def build(out: TurnOutput, usage: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            return self._final(turn, shape, shape.output(out), usage, out.finish_reason), input_items

        turn.build_response = build
        return turn, shape

    async def complete(self, turn: Turn, shape: _Shape) -> dict[str, Any]:
        progress, events = self.chat.event_stream(turn)
        out = TurnOutput()
        try:
            async for ev in events:
                out.add(ev)
        finally:
            await self.chat.finish(turn, progress, "client_disconnected")
        return self._final(turn, shape, shape.output(out), self.chat.usage(progress), out.finish_reason)

    def _final(self, turn: Turn, shape: _Shape, output: list[dict[str, Any]], usage: Any, finish: str | None) -> dict[str, Any]:
        """The finished response object, as returned, streamed last and stored."""
        # No cost here: it is settled after the response is stored, and the stored object
        # must equal the returned one (GET /v1/usage and the trace carry it).
        shape.extensions = {k: v for k, v in self.chat.extensions(turn).items() if k != "cost"}
        return shape.response("completed", output, usage, finish)

    async def open_stream(self, turn: Turn, shape: _Shape) -> AsyncIterator[str]:
        """Start generating; errors before the first event raise (a normal HTTP error)."""
        progress, events = self.chat.event_stream(turn)
        return self._sse(turn, shape, progress, events, await first_event(events))

    async def _sse(self, turn: Turn, shape: _Shape, progress: Any, events: AsyncIterator[Any], first: Any) -> AsyncIterator[str]:
        seq = 0

        def emit(kind: str, **fields: Any) -> str:
            nonlocal seq
            body = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        out = TurnOutput()
        items: list[dict[str, Any]] = []  # output items as they open
        open_kind: str | None = None  # "message" | "call"

        def close_open() -> list[str]:
            nonlocal open_kind
            frames = []
            index = len(items) - 1
            if open_kind == "message":
                part = {"type": "output_text", "text": out.text, "annotations": shape.annotations(out.text), "logprobs": []}
                frames.append(emit("response.output_text.done", item_id=shape.msg_id, output_index=index, content_index=0, text=out.text, logprobs=[]))
                frames.append(emit("response.content_part.done", item_id=shape.msg_id, output_index=index, content_index=0, part=part))
                # Cut at max_output_tokens or withheld by a rail: the item is incomplete, as
                # in the final response.
                cut = out.finish_reason in ("length", "content_filter")
                items[index] = shape.message_item(out.text, "incomplete" if cut else "completed")
                frames.append(emit("response.output_item.done", output_index=index, item=items[index]))
            elif open_kind == "call":
                k = len(out.calls) - 1
                call = out.calls[k]
                frames.append(emit("response.function_call_arguments.done", item_id=shape.call_item_id(k), output_index=index, arguments=call["arguments"]))
                items[index] = shape.call_item(k, call)
                frames.append(emit("response.output_item.done", output_index=index, item=items[index]))
            open_kind = None
            return frames

        try:
            yield emit("response.created", response=shape.response("in_progress", []))
            yield emit("response.in_progress", response=shape.response("in_progress", []))
            fs = shape.file_search_item()
            if fs is not None:
                items.append(fs)
                yield emit("response.output_item.added", output_index=0, item={**fs, "status": "in_progress"})
                yield emit("response.file_search_call.completed", output_index=0, item_id=shape.fs_id)
                yield emit("response.output_item.done", output_index=0, item=fs)
            ev = first
            while ev is not None:
                if ev.kind == "text" and ev.text:
                    if open_kind != "message":
                        for frame in close_open():
                            yield frame
                        items.append(shape.message_item("", "in_progress"))
                        open_kind = "message"
                        yield emit("response.output_item.added", output_index=len(items) - 1, item=items[-1])
                        yield emit("response.content_part.added", item_id=shape.msg_id, output_index=len(items) - 1, content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                    out.add(ev)
                    yield emit("response.output_text.delta", item_id=shape.msg_id, output_index=len(items) - 1, content_index=0, delta=ev.text, logprobs=[])
                elif ev.kind == "call":
                    for frame in close_open():
                        yield frame
                    out.add(ev)
                    k = len(out.calls) - 1
                    items.append(shape.call_item(k, out.calls[k], "in_progress"))
                    open_kind = "call"
                    yield emit("response.output_item.added", output_index=len(items) - 1, item=items[-1])
                elif ev.kind == "args":
                    out.add(ev)
                    yield emit("response.function_call_arguments.delta", item_id=shape.call_item_id(ev.call), output_index=len(items) - 1, delta=ev.text)
                elif ev.kind == "finish":
                    out.add(ev)
                ev = await anext(events, None)
            for frame in close_open():
                yield frame
            if not any(i["type"] == "message" for i in items) and not out.calls:
                items.append(shape.message_item(""))  # an empty answer is still a message
            final = self._final(turn, shape, items, self.chat.usage(progress), out.finish_reason)
            # The terminal event names the outcome: response.incomplete for a truncated or
            # deflected answer (the OpenAI Agents SDK keys on it), else response.completed.
            yield emit("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
        except EnclaveError as exc:
            detail = exc.to_body()["error"]
            yield emit("error", code=detail.get("code"), message=detail.get("message"), param=detail.get("param"))
            for item in items:
                if item.get("status") == "in_progress":
                    item["status"] = "incomplete"
            failed = shape.response("failed", items, self.chat.usage(progress), error={"code": detail.get("code") or "server_error", "message": detail.get("message")})
            yield emit("response.failed", response=failed)
        finally:
            await events.aclose()
            await self.chat.finish(turn, progress, "client_disconnected")
