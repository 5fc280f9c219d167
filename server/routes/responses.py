"""POST /v1/responses, GET and DELETE /v1/responses/{id}, GET …/input_items."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server import responses
from server.auth import Principal, authorize
from server.protocol import ErrorResponse, ResponsesRequest
from server.routing import RouteRequest, has_failed_tool_result, last_user_text
from server.toolcalls.spec import declares_server_tools
from server.turn.actor import Actor
from server.turn.dispatch import dispatch
from server.turn.encoders import responses as encoder
from server.turn.encoders.responses_shape import ResponseShape
from server.turn.ledger import Admission
from server.turn.pipeline import ChatServing
from server.turn.state import Turn

router = APIRouter(prefix="/v1/responses")

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


class Responses:
    name = "responses"

    def route_request(self, body: ResponsesRequest) -> RouteRequest:
        said = responses.said(body)
        return RouteRequest(last_user_text(said), body.conversation_name(), body.previous_response_id, has_failed_tool_result(said), stored=body.store)

    def admission(self, body: ResponsesRequest) -> Admission:
        return Admission(self.name, body.model, body.max_output_tokens, declares_server_tools(body.tools))

    def with_model(self, body: ResponsesRequest, model: str) -> ResponsesRequest:
        return body.model_copy(update={"model": model})

    async def prepare(self, serving: ChatServing, body: ResponsesRequest, started: float, principal: Principal, actor: Actor | None = None) -> tuple[Turn, ResponseShape]:
        return await responses.prepare(serving, body, started, principal, actor)

    async def complete(self, serving: ChatServing, turn: Turn, shape: ResponseShape) -> dict[str, Any]:
        return await encoder.complete(serving, turn, shape)

    async def open_stream(self, serving: ChatServing, turn: Turn, shape: ResponseShape) -> AsyncIterator[str]:
        return await encoder.open_stream(serving, turn, shape)


API = Responses()


@router.post("", responses=_ERRORS, summary="Create a model response (stored and continuable; streamed as typed events when stream is true).")
async def create_response(body: ResponsesRequest, request: Request, principal: Principal = Depends(authorize)) -> Response:
    return await dispatch(request, principal, body, API, body.model, body.stream)


def _conversations(request: Request):
    return request.app.state.runtime.require_memory().conversations


@router.get("/{response_id}", responses=_ERRORS, summary="Get a stored response.")
async def get_response(response_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await asyncio.to_thread(_conversations(request).get_response, principal, response_id)


@router.get("/{response_id}/input_items", responses=_ERRORS, summary="List the input items of a stored response.")
async def list_input_items(response_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    items = await asyncio.to_thread(_conversations(request).input_items, principal, response_id)
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None, "has_more": False}


@router.delete("/{response_id}", responses=_ERRORS, summary="Delete a stored response.")
async def delete_response(response_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    await asyncio.to_thread(_conversations(request).delete_response, principal, response_id)
    return {"id": response_id, "object": "response", "deleted": True}
