"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.auth import require_scope
from server.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse

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
    ctx = await runtime.memory.for_chat(body, principal) if runtime.memory is not None else None
    turn = await serving.prepare_stateful(body, started, principal, ctx) if ctx is not None else await serving.prepare(body, started, principal)
    headers = {"x-request-id": turn.request_id}
    if body.stream:
        events = await serving.open_stream(turn)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    return await complete_unless_disconnected(request, serving.complete(turn), headers)


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
