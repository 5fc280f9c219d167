"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.auth import Principal, authorize
from server.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse
from server.routing import RouteRequest, has_failed_tool_result, last_user_text
from server.toolcalls.spec import declares_server_tools
from server.turn.actor import Actor
from server.turn.dispatch import dispatch
from server.turn.encoders import chat
from server.turn.ledger import Admission
from server.turn.pipeline import ChatServing
from server.turn.state import Turn

router = APIRouter(prefix="/v1")


class ChatCompletions:
    name = "chat.completions"

    def route_request(self, body: ChatCompletionRequest) -> RouteRequest:
        said = [{"role": m.role, "content": m.content} for m in body.messages]
        return RouteRequest(last_user_text(said), body.conversation, None, has_failed_tool_result(said), stored=bool(body.conversation))

    def admission(self, body: ChatCompletionRequest) -> Admission:
        max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return Admission(self.name, body.model, max_new, declares_server_tools(body.tools))

    def with_model(self, body: ChatCompletionRequest, model: str) -> ChatCompletionRequest:
        return body.model_copy(update={"model": model})

    async def prepare(self, serving: ChatServing, body: ChatCompletionRequest, started: float, principal: Principal, actor: Actor | None = None) -> tuple[Turn, None]:
        if actor is not None:
            body = actor.chat_request(body, serving.served_names[0])
        memory = serving.memory
        ctx = await memory.for_chat(body, principal) if memory is not None else None
        if ctx is not None:
            if actor is not None:
                actor.shape_context(ctx)
            return await serving.prepare_stateful(body, started, principal, ctx, actor=actor), None
        return await serving.prepare(body, started, principal, actor), None

    async def complete(self, serving: ChatServing, turn: Turn, shape: None) -> ChatCompletion:
        return await chat.complete(serving, turn)

    async def open_stream(self, serving: ChatServing, turn: Turn, shape: None) -> AsyncIterator[str]:
        return await chat.open_stream(serving, turn)


API = ChatCompletions()


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    summary="Create a chat completion (streamed as server-sent events when stream is true).",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, principal: Principal = Depends(authorize)) -> Response:
    return await dispatch(request, principal, body, API, body.model, body.stream)
