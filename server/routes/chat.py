"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.auth import Principal, authorize
from server.errors import EnclaveError, ServiceUnavailableError
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
async def create_chat_completion(body: ChatCompletionRequest, request: Request, principal: Principal = Depends(authorize)) -> Response:
    started = time.perf_counter()
    runtime = request.app.state.runtime

    def route() -> RouteRequest:
        said = [{"role": m.role, "content": m.content} for m in body.messages]
        return RouteRequest(last_user_text(said), body.conversation, None, has_failed_tool_result(said))

    async def attempt(serving: ChatServing, routed: Routed | None) -> Response:
        asked = body.model_copy(update={"model": routed.decision.model}) if routed is not None else body

        async def prepare() -> Turn:
            ctx = await runtime.memory.for_chat(asked, principal) if runtime.memory is not None else None
            return await serving.prepare_stateful(asked, started, principal, ctx) if ctx is not None else await serving.prepare(asked, started, principal)

        max_new = asked.max_completion_tokens if asked.max_completion_tokens is not None else asked.max_tokens
        turn = await begin_turn(serving, request, principal, "chat.completions", asked.model, max_new, runs_server_tools(asked.tools), prepare, routed)
        with untouched_on_unavailable(turn):
            headers = turn_headers(turn)
            if asked.stream:
                events = await serving.open_stream(turn)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            return await complete_unless_disconnected(request, serving.complete(turn), headers)

    return await serve_routed(runtime, body.model, principal, route, attempt)


@dataclass
class Routed:
    """A turn asked for under a routing alias: where it went, and when it was decided."""

    decision: Decision
    start: float
    end: float


async def route_turn(runtime: Any, model: str, principal: Principal, route: Callable[[], RouteRequest]) -> tuple[ChatServing, Routed | None]:
    """The serving for the model a request names; for the routing alias, the tier the
    router picks (routing, and reading the request for it, is only paid for by requests
    that ask for it)."""
    router = runtime.router
    if router is None or model != router.alias:
        return runtime.select(model), None
    runtime.require_chat()
    start = time.time()
    serving, decision = await router.route(principal, route())
    return serving, Routed(decision, start, time.time())


async def serve_routed(
    runtime: Any, model: str, principal: Principal, route: Callable[[], RouteRequest], attempt: Callable[[ChatServing, Routed | None], Awaitable[Response]]
) -> Response:
    """Run a turn where the model or the router sends it. A routed turn whose tier turned
    out to be down before anything of the turn ran (every upstream refused its first model
    call; that marked them down) runs once more where the router now sends it, so clients
    see the fallback rather than a 503 in the seconds before a health probe would."""
    serving, routed = await route_turn(runtime, model, principal, route)
    try:
        return await attempt(serving, routed)
    except ServiceUnavailableError as exc:
        if routed is None or not getattr(exc, "nothing_ran", False):
            raise
        again, rerouted = await route_turn(runtime, model, principal, route)
        if again is serving:
            raise
        return await attempt(again, rerouted)


@contextmanager
def untouched_on_unavailable(turn: Turn) -> Iterator[None]:
    """Mark an upstream outage that struck before the turn ran any tool (or streamed
    anything, since it was raised here): running the turn elsewhere repeats nothing."""
    try:
        yield
    except ServiceUnavailableError as exc:
        exc.nothing_ran = exc.code == "upstream_unavailable" and not turn.server_calls and turn.pending_action is None  # type: ignore[attr-defined]
        raise


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
        if isinstance(exc, ServiceUnavailableError):
            # Failing while preparing (a summary the engine could not write) runs nothing.
            exc.nothing_ran = exc.code == "upstream_unavailable"  # type: ignore[attr-defined]
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
