"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.auth import Principal, require_scope
from server.errors import EnclaveError
from server.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse
from server.routing import (
    Decision,
    RouteRequest,
    has_failed_tool_result,
    last_user_text,
)
from server.telemetry import tracing
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
    said = [{"role": m.role, "content": m.content} for m in body.messages]
    serving, routed = await route_turn(runtime, body.model, principal, RouteRequest(last_user_text(said), body.conversation, None, has_failed_tool_result(said)))
    if routed is not None:
        body = body.model_copy(update={"model": routed.decision.model})

    async def prepare() -> Turn:
        ctx = await runtime.memory.for_chat(body, principal) if runtime.memory is not None else None
        return await serving.prepare_stateful(body, started, principal, ctx) if ctx is not None else await serving.prepare(body, started, principal)

    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    turn = await begin_turn(serving, request, principal, "chat.completions", body.model, max_new, runs_server_tools(body.tools), prepare, routed)
    headers = turn_headers(turn)
    if body.stream:
        events = await serving.open_stream(turn)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    return await complete_unless_disconnected(request, serving.complete(turn), headers)


@dataclass
class Routed:
    """A turn asked for under a routing alias: where it went, and when it was decided."""

    decision: Decision
    start: float
    end: float


async def route_turn(runtime: Any, model: str, principal: Principal, route: RouteRequest) -> tuple[ChatServing, Routed | None]:
    """The serving for the model a request names; for the routing alias, the tier the
    router picks (routing is only paid for by requests that ask for it)."""
    router = runtime.router
    if router is None or model != router.alias:
        return runtime.select(model), None
    runtime.require_chat()
    start = time.time()
    serving, decision = await router.route(principal, route)
    return serving, Routed(decision, start, time.time())


def turn_headers(turn: Turn) -> dict[str, str]:
    headers = {"x-request-id": turn.request_id, **turn.telemetry.headers}
    if turn.route is not None:
        headers.update(turn.route.headers())
    return headers


def runs_server_tools(tools: list[dict[str, Any]] | None) -> bool:
    """Server tools make a turn several model calls (its budget hold covers them all)."""
    return any(isinstance(t, dict) and t.get("type") == "server" for t in tools or [])


async def begin_turn(
    serving: ChatServing,
    request: Request,
    principal: Principal,
    api: str,
    model: str,
    max_new: int | None,
    server_tools: bool,
    prepare: Callable[[], Awaitable[Any]],
    routed: Routed | None = None,
) -> Any:
    """Open the turn's trace, admit it against the key's budget (429 when it cannot be
    covered), then prepare it; a turn that fails before it runs releases its hold."""
    requested = routed.decision.alias if routed is not None else model
    telemetry = await serving.begin(principal, api, request.headers, requested, max_new, server_tools)
    if routed is not None and telemetry.trace is not None:
        telemetry.trace.set(**routed.decision.trace_attributes())
        tracing.record(f"route {routed.decision.alias}", routed.start, routed.end, **routed.decision.trace_attributes())
    try:
        prepared = await prepare()
    except BaseException as exc:
        await serving.abandon(telemetry, principal, exc)
        if isinstance(exc, EnclaveError):
            exc.headers = telemetry.headers  # the error response names its trace too
        raise
    turn = prepared[0] if isinstance(prepared, tuple) else prepared
    turn.telemetry = telemetry
    turn.route = routed.decision if routed is not None else None
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
