"""The dispatcher: every turn-running route's one way in.

It picks the serving (by model name, by the router for the routing alias, by the agent
for `agent:<name>`), opens the turn's ledger (trace and budget hold) before anything
runs, lets the agent stage choose who runs an agent's turn (server/agents/director.py),
has the API prepare the turn (with the agent or workflow that runs it: its actor), and
answers with the API's encoder. A routed turn whose tier turned out to be down before
anything of the turn ran (every upstream refused its first model call; that marked them
down) runs once more where the router now sends it, so clients see the fallback rather
than a 503 in the seconds before a health probe would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.agents.config import AgentConfig
from server.auth import Principal
from server.errors import ServiceUnavailableError
from server.routing import Decision, RouteRequest
from server.telemetry import tracing
from server.turn.actor import Actor
from server.turn.ledger import Admission, TurnLedger
from server.turn.pipeline import ChatServing
from server.turn.state import Turn

# Sent when the client has gone: nobody reads it, but the access log shows what happened.
CLIENT_CLOSED = 499
_GONE = object()  # what unless_disconnected returns when the client left

Body = TypeVar("Body")
Shape = TypeVar("Shape")


class TurnAPI(Protocol, Generic[Body, Shape]):
    """What one API (chat completions, Responses) contributes to a turn."""

    name: str  # the trace's operation: "chat.completions" | "responses"

    def route_request(self, body: Body) -> RouteRequest: ...

    def admission(self, body: Body) -> Admission: ...

    def with_model(self, body: Body, model: str) -> Body: ...

    async def prepare(self, serving: ChatServing, body: Body, started: float, principal: Principal, actor: Actor | None = None) -> tuple[Turn, Shape]: ...

    async def complete(self, serving: ChatServing, turn: Turn, shape: Shape) -> Any: ...

    async def open_stream(self, serving: ChatServing, turn: Turn, shape: Shape) -> AsyncIterator[str]: ...


@dataclass
class Routed:
    """A turn asked for under a routing alias: where it went, and when it was decided."""

    decision: Decision
    start: float
    end: float


class _Attempt:
    """Whether a failed attempt ran something (a tool, a confirmation) that running the
    turn elsewhere would repeat."""

    ran = False


async def dispatch(request: Request, principal: Principal, body: Any, api: TurnAPI, model: str, stream: bool) -> Response:
    started = time.perf_counter()
    runtime = request.app.state.runtime
    if runtime.agents is not None and runtime.agents.is_agent(model):
        asked = runtime.agents.named(model)
        return await _run(request, principal, body, api, runtime.agent_serving(asked), None, started, stream, _Attempt(), asked)
    if runtime.workflows is not None and runtime.workflows.is_workflow(model):
        workflow = runtime.workflows.turn(model, principal)
        return await _run(request, principal, body, api, runtime.require_chat(), None, started, stream, _Attempt(), workflow)
    serving, routed = await _route(runtime, model, principal, lambda: api.route_request(body))
    attempt = _Attempt()
    try:
        return await _run(request, principal, body, api, serving, routed, started, stream, attempt)
    except ServiceUnavailableError as exc:
        if routed is None or exc.code != "upstream_unavailable" or attempt.ran:
            raise
        again, rerouted = await _route(runtime, model, principal, lambda: api.route_request(body))
        if again is serving:
            raise
        return await _run(request, principal, body, api, again, rerouted, started, stream, _Attempt())


async def _route(runtime: Any, model: str, principal: Principal, route: Callable[[], RouteRequest]) -> tuple[ChatServing, Routed | None]:
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


async def _run(
    request: Request,
    principal: Principal,
    body: Any,
    api: TurnAPI,
    serving: ChatServing,
    routed: Routed | None,
    started: float,
    stream: bool,
    attempt: _Attempt,
    actor: AgentConfig | Actor | None = None,
) -> Response:
    """`actor`: the agent asked for (`agent:<name>`; `serving` is then its model's), or
    the workflow (`workflow:<name>`)."""
    asked = api.with_model(body, routed.decision.model) if routed is not None else body
    admission = api.admission(asked)
    if routed is not None:
        admission.model = routed.decision.alias
    if actor is not None:
        admission.server_tools = True  # an agent's tools and handoffs, a workflow's nodes: several model calls
    ledger = await TurnLedger.open(serving.ledgers, principal, request.headers, admission, serving.engine.max_model_len, serving.max_tool_steps)
    if routed is not None and ledger.trace is not None:
        ledger.trace.set(**routed.decision.trace_attributes())
        tracing.record(f"route {routed.decision.alias}", routed.start, routed.end, **routed.decision.trace_attributes())
    try:
        if isinstance(actor, AgentConfig):
            serving, actor = await _direct(request.app.state.runtime, principal, actor, api.route_request(body), ledger, serving)
        turn, shape = await api.prepare(serving, asked, started, principal, actor)
    except BaseException as exc:
        await ledger.abandon(exc)  # a turn that failed before it ran releases its hold
        raise
    turn.ledger = ledger
    turn.report.route = routed.decision if routed is not None else None
    headers = {"x-request-id": turn.request_id, **ledger.headers, **(routed.decision.headers() if routed is not None else {})}
    try:
        if stream:
            return StreamingResponse(await api.open_stream(serving, turn, shape), media_type="text/event-stream", headers=headers)
        result = await unless_disconnected(request, api.complete(serving, turn, shape))
    except ServiceUnavailableError:
        attempt.ran = bool(turn.report.server_calls) or turn.report.pending_action is not None
        raise
    if result is _GONE:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(result.model_dump() if hasattr(result, "model_dump") else result, headers=headers)


async def _direct(runtime: Any, principal: Principal, agent: AgentConfig, route: RouteRequest, ledger: TurnLedger, serving: ChatServing) -> tuple[ChatServing, Actor]:
    """The agent stage (server/agents/director.py): who runs the turn, charged to its
    ledger; the turn moves to that agent's model."""
    agent_turn = await runtime.agents.direct(principal, agent, route, runtime.agent_serving)
    chosen = runtime.agent_serving(agent_turn.agent)
    if chosen is not serving:
        ledger.move_to(chosen.ledgers)
    if agent_turn.workflow is not None:  # handed to a workflow: it runs the turn, on the agent's model
        return chosen, runtime.workflows.turn(f"workflow:{agent_turn.workflow}", principal, via=agent_turn)
    return chosen, agent_turn


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Race a non-streamed answer against the client hanging up (vLLM's
    `with_cancellation` does the same for its handlers): a client that leaves stops its
    turn (the generation is aborted, the turn settled as disconnected) instead of running
    it to the end. Returns _GONE then. The work runs as a task of its own, which
    sees the turn's context (trace, charge) as it was when it started; a stream needs no
    race, since writing to a client that left ends it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return _GONE
    watcher.cancel()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
