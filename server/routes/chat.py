"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.auth import Principal, require_scope
from server.errors import EnclaveError
from server.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse
from server.turn import ChatServing, Turn

router = APIRouter(prefix="/v1")

# Sent when the client has gone: nobody reads it, but the access log shows what happened.
CLIENT_CLOSED = 499


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    summary="Create a chat completion (streamed as server-sent events when stream is true).",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, principal=Depends(require_scope("chat"))) -> Response:
    started = time.perf_counter()
    runtime = request.app.state.runtime
    serving = runtime.require_chat()

    async def prepare() -> Turn:
        ctx = await runtime.memory.for_chat(body, principal) if runtime.memory is not None else None
        return await serving.prepare_stateful(body, started, principal, ctx) if ctx is not None else await serving.prepare(body, started, principal)

    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    turn = await begin_turn(serving, request, principal, "chat.completions", body.model, max_new, runs_server_tools(body.tools), prepare)
    headers = {"x-request-id": turn.request_id, **turn.telemetry.headers}
    if body.stream:
        events = await serving.open_stream(turn)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    return await complete_unless_disconnected(request, serving.complete(turn), headers)


def runs_server_tools(tools: list[dict[str, Any]] | None) -> bool:
    """Server tools make a turn several model calls (its budget hold covers them all)."""
    return any(isinstance(t, dict) and t.get("type") == "server" for t in tools or [])


async def begin_turn(
    serving: ChatServing, request: Request, principal: Principal, api: str, model: str, max_new: int | None, server_tools: bool, prepare: Callable[[], Awaitable[Any]]
) -> Any:
    """Open the turn's trace, admit it against the key's budget (429 when it cannot be
    covered), then prepare it; a turn that fails before it runs releases its hold."""
    telemetry = await serving.begin(principal, api, request.headers, model, max_new, server_tools)
    try:
        prepared = await prepare()
    except BaseException as exc:
        await serving.abandon(telemetry, principal, exc)
        if isinstance(exc, EnclaveError):
            exc.headers = telemetry.headers  # the error response names its trace too
        raise
    turn = prepared[0] if isinstance(prepared, tuple) else prepared
    turn.telemetry = telemetry
    return prepared


async def complete_unless_disconnected(request: Request, work: Awaitable[Any], headers: dict[str, str]) -> Response:
    """A non-streaming client that hangs up would otherwise keep its generation running
    to the end; race the generation against the disconnect and cancel the loser."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=CLIENT_CLOSED)
    watcher.cancel()
    result = task.result()
    return JSONResponse(result.model_dump() if hasattr(result, "model_dump") else result, headers=headers)
