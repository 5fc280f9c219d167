"""The Responses API's requests on top of the chat pipeline.

A Responses request becomes a chat request (sampling, function tools, text format) plus a
ContextRequest (the conversation to continue, whether to store, the vector stores of a
`file_search` tool); ChatServing runs the turn exactly as for chat completions, and
server/turn/encoders/responses.py shapes its events into a `response` object or the
typed event stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.auth import Principal
from server.errors import InvalidRequestError
from server.ids import new_id
from server.mcp.hosted import HostedMCP, approval_messages
from server.mcp.hosted import chat_tools as mcp_chat_tools
from server.memory.context import ContextRequest
from server.protocol import ChatCompletionRequest, ResponsesRequest
from server.telemetry.redaction import mask_pii
from server.toolcalls.format import call_text
from server.turn.actor import Actor
from server.turn.encoders.responses import final
from server.turn.encoders.responses_shape import ResponseShape
from server.turn.events import Choice
from server.turn.pipeline import ChatServing
from server.turn.state import Turn

DEFAULT_MAX_RESULTS = 4


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
            stored.append({"id": item.get("id") or new_id("message"), "type": "message", "role": role, "content": [{"type": "input_text" if role != "assistant" else "output_text", "text": text}]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise InvalidRequestError(f"{where} needs call_id and output (a string)", param=f"input.{i}")
            messages.append({"role": "tool", "content": output})
            stored.append({"id": item.get("id") or new_id("function_call_output"), "type": "function_call_output", "call_id": item["call_id"], "output": output})
        elif kind == "mcp_approval_response":
            messages.extend(approval_messages(item, where))
            stored.append({"id": item.get("id") or new_id("mcp_approval_response"), **{k: item.get(k) for k in ("type", "approval_request_id", "approve", "reason")}})
        elif kind == "mcp_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments"), str):
                raise InvalidRequestError(f"{where} needs name and arguments (a JSON string)", param=f"input.{i}")
            messages.append({"role": "assistant", "content": call_text([{"function": {"name": item["name"], "arguments": item["arguments"]}}])})
            messages.append({"role": "tool", "content": str(item.get("output") or item.get("error") or "")})
            stored.append(dict(item))
        elif kind in ("mcp_list_tools", "mcp_approval_request"):
            stored.append(dict(item))  # what the previous response showed; nothing for the model
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


def split_tools(req: ResponsesRequest, registry: Any = None, hosted: HostedMCP | None = None) -> tuple[list[dict[str, Any]] | None, Any, list[str], int]:
    """(chat tools, chat tool_choice, file_search vector store ids, max results); the
    request's `mcp` tools are added to `hosted` (server/mcp/hosted.py)."""
    hosted = hosted if hosted is not None else HostedMCP()
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
        elif kind == "mcp":
            chat_tools.extend(mcp_chat_tools(tool, i, registry, hosted))
        else:
            raise InvalidRequestError(f"tools[{i}]: tools of type {kind!r} are not supported", param=f"tools.{i}.type", code="unsupported_tool")
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") in ("function", "mcp") and choice.get("name"):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        elif choice.get("type") == "mcp":
            choice = "required"  # a server's tools, whichever fits
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
        "cache": req.cache,
    }
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid request: {exc}", param="text") from None


async def prepare(chat: ChatServing, req: ResponsesRequest, started: float, principal: Principal, actor: Actor | None = None) -> tuple[Turn, ResponseShape]:
    """The turn of a Responses request (run by `actor`, when it is asked for as an agent
    or a workflow), and the shape its response will take."""
    asked = req  # what the response echoes: never an agent's instructions or tools
    if actor is not None:
        req = actor.responses_request(req, chat.served_names[0])
    memory = chat.memory
    if memory is None:
        raise InvalidRequestError("the Responses API needs the memory services, which are not enabled")
    new_messages, input_items, system_in_input = input_messages(req)
    hosted = HostedMCP()
    tools, tool_choice, stores, max_results = split_tools(req, chat.executor.registry if chat.executor is not None else None, hosted)
    request = chat_request(req, tools, tool_choice)
    conversation = req.conversation_name()
    thread = None
    if req.store or req.previous_response_id or conversation:
        thread = await asyncio.to_thread(memory.conversations.thread, principal, conversation=conversation, previous_response_id=req.previous_response_id)
    instructions = "\n\n".join(x for x in [req.instructions or "", system_in_input] if x)
    ctx = ContextRequest(instructions, new_messages, thread, store=req.store, vector_store_ids=stores, max_results=max_results)
    if actor is not None:
        actor.shape_context(ctx)
    response_id = new_id("response")
    turn = await chat.prepare_stateful(request, started, principal, ctx, request_id=response_id, actor=actor)
    if chat.guard is not None:
        input_items = _masked_items(input_items)  # personal data masked, as the model saw it
    shape = ResponseShape(asked, ctx, response_id, chat.model, hosted, turn.report)

    def stored_as(answer: Choice, usage: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return final(chat, turn, shape, shape.output(answer), usage, answer.finish_reason), input_items

    turn.stored_as = stored_as
    return turn, shape


def said(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The input as role/content pairs, for the router (validation comes later)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out = []
    for item in body.input:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            out.append({"role": "tool", "content": item.get("output")})
        elif isinstance(item, dict) and str(item.get("type", "")).startswith("mcp_"):
            continue  # MCP items: not words of the user
        elif isinstance(item, dict):
            out.append({"role": item.get("role"), "content": item.get("content")})
    return out
