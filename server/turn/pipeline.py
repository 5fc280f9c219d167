"""One model's turn pipeline: the stages, wired once, and the order they run in.

    prepare:  plan tools → input gate (rails; alongside generation when safe)
              → context (stateful turns) → tool shortlist → prompt
    run:      [gated] → [cache hit |] [answer from sources |] generation [→ decline retry]
              | tool loop → output guard
              [→ cache store]
              → audit (guard ledger) → persist (stateful) → settle (turn ledger)

The encoders (server/turn/encoders) turn the events of `run` into an API's shape; the
dispatcher (server/turn/dispatch.py) admits the turn, routes it and calls `prepare`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.auth import Principal
from server.config import SourceAnswerPolicy
from server.engine.base import Engine
from server.errors import InvalidRequestError, ModelNotFoundError
from server.guard import Guard
from server.ids import chat_completion_id
from server.memory.context import ContextRequest, MemoryServices
from server.protocol import ChatCompletionRequest, Usage
from server.telemetry.cost import Accounting
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import Tracing
from server.toolcalls.executor import Executor
from server.toolcalls.grounding import conversation_text
from server.toolcalls.shortlist import Shortlister
from server.toolcalls.spec import ToolPlan, plan_tools
from server.turn.actor import Actor
from server.turn.cache_stage import CacheStage
from server.turn.context import ContextStage
from server.turn.decline_retry import DeclineRetry
from server.turn.events import Choice, Kind, TurnEvent
from server.turn.generation import Generation
from server.turn.guard_ledger import GuardLedger
from server.turn.input_gate import InputGate
from server.turn.ledger import LedgerServices
from server.turn.output_guard import OutputGuard
from server.turn.prompt import Prompt
from server.turn.source_answer import SourceAnswer
from server.turn.state import Progress, Turn, TurnRequest
from server.turn.tool_loop import ToolLoop

log = logging.getLogger(__name__)


@dataclass
class TurnRun:
    """A turn's events as they are generated, and what they have used so far."""

    turn: Turn
    progress: Progress
    events: AsyncIterator[TurnEvent]

    async def aclose(self) -> None:
        """Stop generating, if the turn is still running; its events settle it on the way out."""
        await self.events.aclose()  # type: ignore[attr-defined]  # settles it (_events)


class ChatServing:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        served_names: list[str],
        embedding_model: str | None = None,
        executor: Executor | None = None,
        max_tool_steps: int = 5,
        memory: MemoryServices | None = None,
        guard: Guard | None = None,
        tracing: Tracing | None = None,
        accounting: Accounting | None = None,
        shortlister: Shortlister | None = None,
        grounding: bool = False,
        source_answers: tuple[Any, SourceAnswerPolicy] | None = None,
    ):
        """`source_answers`: (the embedder's handle, the policy) when answers are built
        from the turn's evidence (server/turn/source_answer.py); None: free answers."""
        self.engine = engine
        self.metrics = metrics
        self.served_names = served_names
        self.embedding_model = embedding_model
        self.executor = executor
        self.max_tool_steps = max_tool_steps
        self.memory = memory
        self.guard = guard
        self.accounting = accounting
        self.model = engine.served_model
        self.ledgers = LedgerServices(self.model, metrics, tracing, accounting)
        self.shortlister = shortlister
        self.prompt = Prompt(engine, guard, grounding)
        self.generation = Generation(engine, metrics)
        self.input_gate = InputGate(guard, engine) if guard is not None else None
        self.output_guard = OutputGuard(guard) if guard is not None and guard.has("output") else None
        self.decline_retry = DeclineRetry(guard, guard.declines, self.generation, metrics) if guard is not None and guard.declines is not None else None
        self.source_answer = SourceAnswer(source_answers[0], engine, self.generation, source_answers[1]) if source_answers is not None else None
        self.tool_loop = ToolLoop(executor, self.generation, self.prompt, guard, max_tool_steps) if executor is not None else None
        self.context_stage = ContextStage(memory, engine) if memory is not None else None
        cache = memory.cache if memory is not None else None
        self.cache_stage = (
            CacheStage(cache, memory.knowledge, self.model, metrics, guard.policy_digest if guard is not None else None)  # type: ignore[union-attr]
            if cache is not None
            else None
        )
        self._e2e = metrics.e2e.labels(model=self.model)

    def available(self) -> bool:
        """Whether the engine can take a turn now (a remote one: some upstream is up)."""
        return self.engine.available()

    # ------------------------------------------------------------ prepare

    def _plan(self, request: ChatCompletionRequest, principal: Principal) -> ToolPlan | None:
        if request.model not in self.served_names:
            if request.model == self.embedding_model:
                raise InvalidRequestError(f"The model `{request.model}` is an embedding model; use /v1/embeddings.", param="model")
            raise ModelNotFoundError(f"The model `{request.model}` does not exist.", param="model")
        registry = self.executor.registry if self.executor else None
        plan = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls, registry, principal)
        if plan is not None and plan.has_server_tools and request.n > 1:
            raise InvalidRequestError("n must be 1 when server tools are used", param="n")
        return plan

    def _new_turn(self, request: ChatCompletionRequest, started: float, principal: Principal, request_id: str | None = None) -> Turn:
        plan = self._plan(request, principal)
        req = TurnRequest(request_id or chat_completion_id(), request, principal, plan, started)
        return Turn(req, GuardLedger())

    def _first_choice(self, turn: Turn) -> str:
        plan = turn.req.plan
        return "none" if turn.report.refusal is not None or plan is None else turn.first_choice or plan.choice

    async def _gate(self, turn: Turn, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return await self.input_gate.check(turn, messages) if self.input_gate is not None else messages

    async def _shortlist(self, turn: Turn) -> None:
        """Offer the model only the tools that fit the user's message (auto, required)."""
        plan = turn.req.plan
        if self.shortlister is None or plan is None or turn.report.refusal is not None or not self.shortlister.applies(plan.tools, plan.choice):
            return
        messages = turn.step.messages
        try:
            offered, ranked = await self.shortlister.shortlist(plan.tools, messages, conversation_text(messages))
        except Exception:  # the embedding failed: every tool is offered, as without a shortlist
            log.warning("tool shortlist failed; offering every tool", exc_info=True)
            return
        if ranked:
            turn.offered = offered
            turn.report.shortlist = {
                "offered": [t.name for t in offered],
                "ranked": [{"name": r.tool.name, "score": round(r.score, 3)} for r in ranked],
            }
            if plan.choice == "auto":
                call = self.shortlister.must_call(ranked)
                turn.report.shortlist["decision"] = "call" if call else "model"
                if call:
                    turn.first_choice = "required"

    async def prepare(self, request: ChatCompletionRequest, started: float, principal: Principal, actor: Actor | None = None) -> Turn:
        """A stateless turn: the request's messages are the whole context."""
        turn = self._new_turn(request, started, principal)
        if actor is not None:
            actor.attach(turn)
        turn.step.messages = await self._gate(turn, request.chat_messages())
        await self._shortlist(turn)
        self.prompt.render(turn, self._first_choice(turn))
        return turn

    async def prepare_stateful(
        self, request: ChatCompletionRequest, started: float, principal: Principal, ctx: ContextRequest, request_id: str | None = None, actor: Actor | None = None
    ) -> Turn:
        """A turn whose context the server assembles: stored history under the token
        budget, recalled memories, retrieved sources; stored when it finishes."""
        if self.context_stage is None:
            raise InvalidRequestError("conversations and knowledge are not enabled on this server")
        turn = self._new_turn(request, started, principal, request_id)
        if request.n > 1:
            raise InvalidRequestError("n must be 1 in a stored conversation or with knowledge retrieval", param="n")
        turn.context = ctx
        if actor is not None:
            actor.attach(turn)
        turn.guards.retrieval(ctx.guard_events)
        ctx.new_messages = await self._gate(turn, ctx.new_messages)
        if turn.report.refusal is not None:
            self.context_stage.refuse(turn)
        else:
            await self.context_stage.assemble(turn)
        await self._shortlist(turn)
        self.prompt.render(turn, self._first_choice(turn))
        return turn

    async def _restart(self, turn: Turn, messages: list[dict[str, str]]) -> None:
        """The input rails refused or rewrote a gated input: prepare again from their text."""
        if turn.context is None:
            turn.step.messages = messages
        else:
            turn.context.new_messages = messages
            if turn.report.refusal is not None:
                self.context_stage.refuse(turn)  # type: ignore[union-attr]
            else:
                await self.context_stage.assemble(turn)  # type: ignore[union-attr]  # a rewritten input
        self.prompt.render(turn, "none" if turn.report.refusal is not None else turn.step.tool_choice)

    # ------------------------------------------------------------ run

    def run(self, turn: Turn) -> TurnRun:
        progress = Progress()
        if turn.report.agent is not None:
            progress.earlier_prompt_tokens, progress.earlier_completion_tokens = turn.report.agent.decision_tokens
        return TurnRun(turn, progress, self._events(turn, progress))

    def _generated(self, turn: Turn, progress: Progress) -> AsyncIterator[TurnEvent]:
        if turn.report.refusal is not None:
            return _refusal(turn)
        if turn.workflow is not None:  # its nodes in place of the model's answer
            events = turn.workflow.events(turn, progress, self.generation)
            return self.output_guard.events(turn, events) if self.output_guard is not None else events
        if self.cache_stage is not None and self.cache_stage.applies(turn):
            return self.cache_stage.events(turn, progress, lambda: self._fresh(turn, progress))
        return self._fresh(turn, progress)

    def _fresh(self, turn: Turn, progress: Progress) -> AsyncIterator[TurnEvent]:
        """The answer generated: by the model, through the rails on its output."""
        plan = turn.req.plan
        if plan is None or not plan.has_server_tools or self.tool_loop is None:
            if self.source_answer is not None and self.source_answer.applies(turn):
                events = self.source_answer.events(turn, progress, lambda: self._answer(turn, progress))
            else:
                events = self._answer(turn, progress)
        else:
            events = self.tool_loop.events(turn, progress)
        if self.output_guard is not None:
            events = self.output_guard.events(turn, events)
        return events

    def _answer(self, turn: Turn, progress: Progress) -> AsyncIterator[TurnEvent]:
        """The model's own answer (a decline in its opening retried)."""
        if self.decline_retry is not None and self.decline_retry.applies(turn):
            return self.decline_retry.events(turn, progress)  # starts the generation
        return self.generation.step_events(turn, progress, turn.engine_request_id, server=set())

    async def _events(self, turn: Turn, progress: Progress) -> AsyncIterator[TurnEvent]:
        stored = Choice() if turn.context is not None else None
        if turn.gate is not None and self.input_gate is not None:
            events = self.input_gate.gated(turn, progress, lambda: self._generated(turn, progress), lambda m: self._restart(turn, m))
        else:
            events = self._generated(turn, progress)
        assert turn.ledger is not None, "a turn runs only once admitted"
        async with turn.ledger.settling(turn, progress) as outcome:
            async for ev in events:
                if stored is not None and ev.index == 0:
                    stored.add(ev)
                yield ev
            self._e2e.observe(time.perf_counter() - turn.req.started)
            if self.guard is not None:
                await turn.guards.audit(self.guard, turn.request_id, turn.req.principal.tenant, turn.req.principal.user)
            if stored is not None:
                await self._persist(turn, stored, progress)
            outcome[0] = "refused" if turn.report.refusal is not None else "completed"

    async def _persist(self, turn: Turn, answer: Choice, progress: Progress) -> None:
        """Store a finished stateful turn (before the client hears it is done: a stored
        turn is acknowledged only once it is on disk)."""
        assert turn.context is not None and self.memory is not None
        response, items = turn.stored_as(answer, self.usage(progress)) if turn.stored_as else (None, None)
        await self.memory.persist(turn.req.principal, turn.context, turn.request_id, self.model, answer.message(), response, items)

    # ------------------------------------------------------------ what the encoders report

    @staticmethod
    def usage(progress: Progress) -> Usage:
        prompt, completion = progress.billed
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def extensions(self, turn: Turn) -> dict[str, Any]:
        """The extension fields of a response (see protocol.ChatCompletion)."""
        out: dict[str, Any] = {}
        report = turn.report
        if report.server_calls:
            out["server_tool_calls"] = [r.public() for r in report.server_calls]
        if report.pending_action is not None:
            out["pending_action"] = report.pending_action
        if self.guard is not None:
            out["guardrails"] = turn.guards.public()
        cost = turn.ledger.cost_info() if turn.ledger is not None else None
        if cost is not None:
            out["cost"] = cost
        if report.route is not None:
            out["routing"] = report.route.public()
        if report.cache is not None:
            out["cache"] = report.cache
        if report.shortlist is not None:
            out["tool_shortlist"] = report.shortlist
        if report.source_answer is not None:
            out["source_answer"] = report.source_answer
        if report.agent is not None:
            out["agent"] = report.agent.public()
        if turn.workflow is not None:
            out["workflow"] = turn.workflow.public()
        ctx = turn.context
        if ctx is not None:
            if ctx.thread is not None:
                out["conversation"] = ctx.thread.conversation_id
            if ctx.window is not None:
                out["context_window"] = ctx.window.info()
            out["recalled_memories"] = [m.public() for m in ctx.recalled]
            out["citations"] = ctx.citations()
        return out


async def _refusal(turn: Turn) -> AsyncIterator[TurnEvent]:
    assert turn.report.refusal is not None
    for i in range(turn.step.params.n):
        yield TurnEvent(Kind.TEXT, i, turn.report.refusal.text)
        yield TurnEvent.finish(i, "content_filter")
