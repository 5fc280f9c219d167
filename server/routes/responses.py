"""POST /v1/responses, GET and DELETE /v1/responses/{id}, GET …/input_items."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from server.auth import Principal, authorize
from server.protocol import ErrorResponse, ResponsesRequest
from server.responses import ResponsesServing
from server.routes.chat import (
    Routed,
    begin_turn,
    complete_unless_disconnected,
    runs_server_tools,
    serve_routed,
    turn_headers,
    untouched_on_unavailable,
)
from server.routing import RouteRequest, has_failed_tool_result, last_user_text
from server.turn import ChatServing

router = APIRouter(prefix="/v1/responses")

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


def _memory(request: Request):
    return request.app.state.runtime.require_memory()


@router.post("", responses=_ERRORS, summary="Create a model response (stored and continuable; streamed as typed events when stream is true).")
async def create_response(body: ResponsesRequest, request: Request, principal: Principal = Depends(authorize)) -> Response:
    started = time.perf_counter()
    runtime = request.app.state.runtime

    def route() -> RouteRequest:
        said = _said(body)
        return RouteRequest(last_user_text(said), body.conversation_name(), body.previous_response_id, has_failed_tool_result(said))

    async def attempt(chat: ChatServing, routed: Routed | None) -> Response:
        asked = body.model_copy(update={"model": routed.decision.model}) if routed is not None else body
        serving = ResponsesServing(chat)
        turn, shape = await begin_turn(
            chat, request, principal, "responses", asked.model, asked.max_output_tokens, runs_server_tools(asked.tools), lambda: serving.prepare(asked, started, principal), routed
        )
        with untouched_on_unavailable(turn):
            headers = turn_headers(turn)
            if asked.stream:
                events = await serving.open_stream(turn, shape)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            return await complete_unless_disconnected(request, serving.complete(turn, shape), headers)

    return await serve_routed(runtime, body.model, principal, route, attempt)


def _said(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The input as role/content pairs, for the router (validation comes later)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out = []
    for item in body.input:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            out.append({"role": "tool", "content": item.get("output")})
        elif isinstance(item, dict):
            out.append({"role": item.get("role"), "content": item.get("content")})
    return out


@router.get("/{response_id}", responses=_ERRORS, summary="Get a stored response.")
async def get_response(response_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await asyncio.to_thread(_memory(request).conversations.get_response, principal, response_id)


@router.get("/{response_id}/input_items", responses=_ERRORS, summary="List the input items of a stored response.")
async def list_input_items(response_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    items = await asyncio.to_thread(_memory(request).conversations.input_items, principal, response_id)
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    }


@router.delete("/{response_id}", responses=_ERRORS, summary="Delete a stored response.")
async def delete_response(response_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    await asyncio.to_thread(_memory(request).conversations.delete_response, principal, response_id)
    return {"id": response_id, "object": "response", "deleted": True}
