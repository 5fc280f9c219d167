"""The per-turn pipeline for chat completions.

A turn is: check the model → plan the tools → input rails (mask, or refuse) → assemble
the context (for a stateful turn: history, summary, recalled memories and retrieved
sources, through the retrieval rails, under the token budget) → (resolve a pending
confirmation) → render the chat template → generate under the tool constraint → run
server-side tools through the tool rails and loop (think → call → observe) → output
rails in checked windows → shape the response → audit what the rails did → store the
turn and write memory. Routes stay thin and engines stay unaware of HTTP.

Both response modes consume one event stream (`_events`): text, a tool call's start,
argument fragments, and a finish per choice. `complete` folds it into one response,
`_sse` writes each event as it comes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server.auth import ANONYMOUS, Principal
from server.engine.base import Engine, GenerationChunk, GenerationParams, TokenLogprob
from server.errors import (
    ConflictError,
    EnclaveError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
)
from server.guard import Guard, GuardEvent, OutputWindow, Verdict
from server.memory.context import ContextRequest, MemoryServices
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    TokenLogprobOut,
    ToolCall,
    Usage,
    chunk_choice,
    chunk_json,
    logprobs_out,
)
from server.routing import Decision
from server.telemetry.cost import Accounting, Charge, current_charge
from server.telemetry.metrics import Metrics
from server.telemetry.redaction import mask_pii
from server.telemetry.tracing import Tracing, TurnTrace
from server.toolcalls.constraint import TEXT, build_constraint
from server.toolcalls.executor import Executor, ToolResult, public_action
from server.toolcalls.format import (
    CallParser,
    call_text,
    canonical_arguments,
    tools_prompt,
    with_tools_prompt,
)
from server.toolcalls.registry import ToolContext
from server.toolcalls.spec import ToolPlan, plan_tools

log = logging.getLogger(__name__)

_ACTION_REF = re.compile(r"\bact_[0-9a-f]{24}\b")
# A confirmation must be explicit; anything else declines (the safe reading).
_AFFIRMATIVE = re.compile(r"^\s*(yes|y|yeah|yep|confirm(ed)?|approve(d)?|go ahead|proceed|do it|ok(ay)?|sure)\b", re.IGNORECASE)


@dataclass
class TurnTelemetry:
    """A turn's trace and its engine-time charge, from admission until it is settled."""

    trace: TurnTrace | None
    charge: Charge
    started_at: float = field(default_factory=time.time)
    cost_usd: float | None = None  # set once settled

    @property
    def headers(self) -> dict[str, str]:
        return self.trace.headers if self.trace is not None else {}


@dataclass
class Turn:
    """A validated chat request, rendered and ready for the engine."""

    request_id: str
    request: ChatCompletionRequest
    prompt_token_ids: list[int]
    params: GenerationParams
    started: float
    created: int = field(default_factory=lambda: int(time.time()))
    messages: list[dict[str, str]] = field(default_factory=list)
    plan: ToolPlan | None = None
    principal: Principal = ANONYMOUS
    choice: str = "none"  # the tool choice of the step being generated
    # Filled in while the turn runs, reported in the response's extension fields.
    server_calls: list[ToolResult] = field(default_factory=list)
    pending_action: dict[str, Any] | None = None
    # A stateful turn (a named conversation, the Responses API, knowledge retrieval).
    context: ContextRequest | None = None
    # Builds the stored API object (the Responses API's) from the finished output.
    build_response: Any = None
    # Guardrails: what the rails changed or stopped, and the input verdict if it blocked.
    guard_events: list[GuardEvent] = field(default_factory=list)
    refusal: Verdict | None = None
    # The input rails' verdicts while generation starts alongside them (see _guard_input).
    input_gate: dict[int, tuple[str, str, dict | None]] | None = None
    gated_messages: list[dict[str, str]] | None = None
    reserve: int = 0  # a stateful turn's token reserve for the answer, kept for a re-assembly
    telemetry: TurnTelemetry | None = None
    route: Decision | None = None  # where the router sent a turn asked for by alias


@dataclass
class TurnOutput:
    """Choice 0 as it was sent: what a stateful turn stores."""

    text: str = ""
    calls: list[dict[str, str]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, ev: _Event) -> None:
        if ev.index != 0:
            return
        if ev.kind == "text":
            self.text += ev.text
        elif ev.kind == "call":
            self.calls.append({"id": ev.call_id, "name": ev.name, "arguments": ""})
        elif ev.kind == "args":
            self.calls[ev.call]["arguments"] += ev.text
        else:
            self.finish_reason = ev.text

    def message(self) -> dict[str, str]:
        """The answer as the chat template will replay it in later turns."""
        calls = call_text([{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.calls]) if self.calls else ""
        return {"role": "assistant", "content": "\n".join(filter(None, [self.text, calls]))}


@dataclass
class _Progress:
    """What a generation has produced so far, per choice, for usage and metrics."""

    completion_tokens: int = 0
    prompt_tokens: int = 0
    first_token_at: float | None = None


@dataclass
class _Event:
    kind: str  # "text" | "call" | "args" | "finish"
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    call: int = 0  # tool call index within the message
    call_id: str = ""
    name: str = ""


async def first_event(events: AsyncIterator[Any]) -> Any:
    """Run a stream up to its first event, so that errors raised before anything was
    sent become a normal HTTP error rather than an error inside a 200 stream."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None
    except BaseException:
        await events.aclose()
        raise


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
    ):
        self.engine = engine
        self.tracing = tracing
        self.accounting = accounting
        self.metrics = metrics
        self.served_names = served_names
        self.embedding_model = embedding_model
        self.executor = executor
        self.max_tool_steps = max_tool_steps
        self.memory = memory
        self.guard = guard
        self.model = engine.served_model
        # Label children resolved once: the per-token path should not hash label dicts.
        self._tokens_out = metrics.generation_tokens.labels(model=self.model)
        self._tokens_in = metrics.prompt_tokens.labels(model=self.model)
        self._running = metrics.running.labels(model=self.model)
        self._ttft = metrics.ttft.labels(model=self.model)
        self._tpot = metrics.tpot.labels(model=self.model)
        self._e2e = metrics.e2e.labels(model=self.model)

    def available(self) -> bool:
        """Whether the engine can take a turn now (a remote one: some upstream is up)."""
        check = getattr(self.engine, "available", None)
        return bool(check()) if check is not None else True

    # ------------------------------------------------------------ telemetry and cost

    async def begin(
        self, principal: Principal, api: str, headers: Any, model: str, max_new_tokens: int | None, server_tools: bool
    ) -> TurnTelemetry:
        """Open the turn's trace (current for this task from here on) and admit it
        against the key's budget before anything runs: rails, memory summaries and the
        model calls of the turn are all charged to it."""
        charge = Charge()
        current_charge.set(charge)
        trace = None
        if self.tracing is not None:
            trace = self.tracing.start_turn(
                api, headers, enclave__tenant=principal.tenant, enclave__user=principal.user, enclave__key_id=principal.key_id, gen_ai__request__model=model
            )
        telemetry = TurnTelemetry(trace, charge)
        if self.accounting is not None and principal.budget_usd is not None:
            new_tokens = max_new_tokens if max_new_tokens is not None else self.engine.max_model_len
            steps = self.max_tool_steps if server_tools else 1
            try:
                await asyncio.to_thread(self.accounting.admit, principal.key_id, principal.budget_usd, charge, new_tokens * steps)
            except BaseException as exc:
                if trace is not None:
                    trace.fail(exc)
                    if isinstance(exc, EnclaveError):
                        exc.headers = trace.headers
                raise
        return telemetry

    async def abandon(self, telemetry: TurnTelemetry, principal: Principal, exc: BaseException) -> None:
        """A turn that failed before it ran: release its hold (billing what it used)."""
        charge = telemetry.charge
        if self.accounting is not None and charge.hold_id is not None and principal.key_id is not None:
            usd = min(self.accounting.cost(charge.engine_seconds), charge.hold_usd)
            await asyncio.to_thread(self.accounting.budgets.settle, principal.key_id, charge.hold_id, usd)
            charge.settled = True
        if telemetry.trace is not None:
            telemetry.trace.fail(exc)

    async def finish(self, turn: Turn, progress: _Progress, outcome: str = "completed") -> None:
        """Settle a turn once, whichever way it ends: its usage row, its budget hold,
        the cost metrics, and the root span's totals."""
        tele = turn.telemetry
        if tele is None or tele.charge.settled:
            return
        tele.charge.settled = True
        conversation = turn.context.thread.conversation_id if turn.context is not None and turn.context.thread is not None else None
        p = turn.principal
        usd = 0.0
        if self.accounting is not None:
            row = {
                "request_id": turn.request_id,
                "at": tele.started_at,
                "tenant": p.tenant,
                "user": p.user,
                "key_id": p.key_id,
                "conversation_id": conversation,
                "model": self.model,
                "prompt_tokens": progress.prompt_tokens,
                "completion_tokens": progress.completion_tokens,
                "duration_s": time.perf_counter() - turn.started,
                "trace_id": tele.trace.trace_id if tele.trace is not None else None,
            }
            try:
                usd = await asyncio.to_thread(self.accounting.settle, p.key_id, tele.charge, row)
            except Exception:  # the answer was given; losing its usage row must not fail it
                log.exception("recording usage of %s failed", turn.request_id)
            self.metrics.cost.labels(model=self.model, tenant=p.tenant).inc(usd)
            self.metrics.engine_seconds.labels(model=self.model).inc(tele.charge.engine_seconds)
            self.metrics.unbilled_seconds.labels(model=self.model).inc(tele.charge.unbilled_seconds)
        tele.cost_usd = usd
        if tele.trace is not None:
            tele.trace.set(
                gen_ai__response__id=turn.request_id,
                gen_ai__response__model=self.model,
                gen_ai__conversation__id=conversation,
                gen_ai__usage__input_tokens=progress.prompt_tokens,
                gen_ai__usage__output_tokens=progress.completion_tokens,
                enclave__engine_seconds=round(tele.charge.engine_seconds, 6),
                enclave__cost_usd=usd,
                enclave__budget_capped=True if tele.charge.capped else None,
                enclave__outcome=outcome,
                enclave__guard__refused=True if turn.refusal is not None else None,
            )
            tele.trace.end()

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

    async def prepare(self, request: ChatCompletionRequest, started: float, principal: Principal = ANONYMOUS) -> Turn:
        """A stateless turn: the request's messages are the whole context."""
        plan = self._plan(request, principal)
        turn = Turn(f"chatcmpl-{uuid.uuid4().hex}", request, [], None, started, plan=plan, principal=principal)  # type: ignore[arg-type]
        turn.messages = await self._guard_input(turn, request.chat_messages())
        self._render_step(turn, plan.choice if plan else "none")
        return turn

    def _input_checks(self, turn: Turn, messages: list[dict[str, str]]) -> dict[int, tuple[str, str, dict | None]]:
        """The rail checks a turn's new input needs, by message index, as (stage, text,
        context): the new user message through the input rails, new tool results
        through the tool-result rails."""
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        checks: dict[int, tuple[str, str, dict | None]] = {}
        if last_user >= 0 and messages[last_user].get("content"):
            # The caller's own tools are in scope for the off-topic rail: an app that
            # declares book_flight has made flights its users' topic.
            tools = [f"{t.name.replace('_', ' ')}: {t.description}" for t in turn.plan.tools if not t.server] if turn.plan else []
            checks[last_user] = ("input", messages[last_user]["content"], {"extra_topics": tools} if tools else None)
        for i, m in enumerate(messages):
            if m["role"] == "tool" and i > last_assistant and m.get("content"):
                checks[i] = ("tool_result", m["content"], None)
        return checks

    async def _run_checks(self, checks: dict[int, tuple[str, str, dict | None]]) -> dict[int, Verdict]:
        assert self.guard is not None
        verdicts = await asyncio.gather(*(self.guard.check(stage, text, ctx) for stage, text, ctx in checks.values()))
        return dict(zip(checks, verdicts, strict=True))

    def _apply_verdicts(self, turn: Turn, messages: list[dict[str, str]], verdicts: dict[int, Verdict]) -> list[dict[str, str]]:
        """The messages as the model may see them: checked ones as their rails left them
        (masked, neutralised; a refused one masked), personal data masked in the rest of
        the history the client sent."""
        out = []
        for i, m in enumerate(messages):
            v = verdicts.get(i)
            if v is not None:
                turn.guard_events += v.events
                if v.blocked:
                    turn.refusal = v
                    m = {**m, "content": mask_pii(m["content"])[0]}
                else:
                    m = {**m, "content": v.text}
            elif m["role"] != "system" and m.get("content"):
                m = {**m, "content": mask_pii(m["content"])[0]}
            out.append(m)
        return out

    async def _guard_input(self, turn: Turn, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The turn's messages after the input-side rails. Runs before memory, retrieval,
        logs or the model see the input, with one exception that changes nothing they
        see: when the new input holds no personal data and no server tool can run, the
        rails' verdict is left pending (`turn.input_gate`) and generation starts at the
        same time; nothing is released, stored or run until the verdict is in (_gated).
        The model then reads exactly what the rails would have passed to it."""
        if self.guard is None:
            return messages
        checks = self._input_checks(turn, messages)
        if not checks:
            return self._apply_verdicts(turn, messages, {})
        # Only a user message is checked alongside: tool results are data the model must
        # not read before their instructions are removed.
        user_only = all(messages[i]["role"] == "user" for i in checks)
        pii_free = not any(mask_pii(messages[i]["content"])[1] for i in checks)
        if user_only and pii_free and (turn.plan is None or not turn.plan.has_server_tools):
            turn.input_gate = checks
            turn.gated_messages = messages
            # Identical to what the rails return unless they refuse or rewrite (then the
            # gate restarts the turn with their text).
            return self._apply_verdicts(turn, messages, {})
        return self._apply_verdicts(turn, messages, await self._run_checks(checks))

    async def prepare_stateful(
        self, request: ChatCompletionRequest, started: float, principal: Principal, ctx: ContextRequest, request_id: str | None = None
    ) -> Turn:
        """A turn whose context the server assembles: stored history under the token
        budget, recalled memories, retrieved sources; stored when it finishes."""
        if self.memory is None:
            raise InvalidRequestError("conversations and knowledge are not enabled on this server")
        plan = self._plan(request, principal)
        if request.n > 1:
            raise InvalidRequestError("n must be 1 in a stored conversation or with knowledge retrieval", param="n")
        turn = Turn(request_id or f"chatcmpl-{uuid.uuid4().hex}", request, [], None, started, plan=plan, principal=principal, context=ctx)  # type: ignore[arg-type]
        ctx.new_messages = await self._guard_input(turn, ctx.new_messages)
        if turn.refusal is not None:
            self._refuse_stateful(turn)
            return turn
        max_out = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        # The tool definitions join the system message later; keep room for them.
        tool_tokens = self.engine.count_tokens(tools_prompt(plan, "auto")) + 8 if plan is not None else 0
        reserve = (max_out if max_out is not None else min(self.memory.output_reserve, self.engine.max_model_len // 4)) + tool_tokens
        turn.reserve = reserve
        turn.messages = await self.memory.assemble(self.engine, principal, ctx, reserve, turn.request_id)
        self._render_step(turn, plan.choice if plan else "none")
        return turn

    def _refuse_stateful(self, turn: Turn) -> None:
        """A refused turn is stored (the user's masked words and the refusal) but never
        becomes a memory, and neither retrieves nor cites anything."""
        ctx = turn.context
        assert ctx is not None
        ctx.memory, ctx.vector_store_ids, ctx.sources, ctx.recalled = False, [], [], []
        turn.messages = ctx.new_messages
        self._render_step(turn, "none")

    def _render_step(self, turn: Turn, choice: str) -> None:
        """Prompt and parameters for the next generation step under `choice`."""
        plan = turn.plan
        messages = self.guard.mark_system_prompt(turn.messages) if self.guard is not None else turn.messages
        prompt = self.engine.render_chat(with_tools_prompt(messages, plan, choice))
        params = turn.request.to_generation_params(len(prompt), self.engine.max_model_len)
        if plan is not None and choice != "none":
            tools = plan.tools if choice in ("auto", "required") else [plan.by_name[choice]]
            constraint = build_constraint([(t.name, t.parameters) for t in tools], allow_text=choice == "auto", parallel=plan.parallel)
            params = dataclasses.replace(params, regex=constraint.regex, json_schema=None)
        elif plan is not None and params.json_schema is None:
            # "none" with calls in the history: small models imitate them as text; the
            # answer must be prose.
            params = dataclasses.replace(params, regex=TEXT)
        turn.prompt_token_ids, turn.params, turn.choice = prompt, params, choice

    # ------------------------------------------------------------ generation

    async def _generate(self, turn: Turn, progress: _Progress, request_id: str, stop_early=lambda: False) -> AsyncIterator[GenerationChunk]:
        """The engine stream with metrics and abort-on-exit wrapped around it.
        `stop_early()` true at exit means the caller stopped on purpose (a looping model)."""
        self._running.inc()
        self._tokens_in.inc(len(turn.prompt_token_ids))
        progress.prompt_tokens += len(turn.prompt_token_ids)
        step_finished: set[int] = set()
        stream = self.engine.generate(request_id, turn.prompt_token_ids, turn.params)
        step_first: float | None = None
        step_tokens = 0
        try:
            async for chunk in stream:
                if chunk.token_ids:
                    now = time.perf_counter()
                    if progress.first_token_at is None:
                        progress.first_token_at = now
                        self._ttft.observe(progress.first_token_at - turn.started)
                    if step_first is None:
                        step_first = now
                    step_tokens += len(chunk.token_ids)
                    step_last = now
                    progress.completion_tokens += len(chunk.token_ids)
                    self._tokens_out.inc(len(chunk.token_ids))
                if chunk.finish_reason == "error":
                    raise self._engine_failure(turn, progress)
                if chunk.finish_reason is not None:
                    step_finished.add(chunk.index)
                    self.metrics.finished.labels(model=self.model, finish_reason=chunk.finish_reason).inc()
                yield chunk
        finally:
            self._running.dec()
            if step_first is not None and step_tokens > turn.params.n:
                # Decode pace: the first token of each choice is prefill's, not decode's.
                self._tpot.observe((step_last - step_first) / (step_tokens - turn.params.n))
            if len(step_finished) < turn.params.n:
                # The client went away (or we failed): free the engine's slot now rather
                # than letting it generate tokens nobody will read.
                await self.engine.abort(request_id)
                reason = "repeated_tool_call" if stop_early() else "client_disconnected"
                self.metrics.aborted.labels(model=self.model, reason=reason).inc()
            await stream.aclose()

    def _engine_failure(self, turn: Turn, progress: _Progress) -> EnclaveError:
        # vLLM compiles the constraint in its engine core and reports a failure only as
        # finish_reason "error"; a schema too complex to compile is the usual cause.
        if turn.params.regex is not None and progress.completion_tokens == 0:
            assert turn.plan is not None
            names = [t.name for t in turn.plan.tools] if turn.choice in ("auto", "required") else [turn.choice]
            return InvalidRequestError(
                f"the parameters schema of tool(s) {', '.join(f'`{n}`' for n in names)} could not be compiled into an "
                "output constraint (too complex or unsupported); simplify it",
                param="tools",
                code="invalid_tool_schema",
            )
        if turn.params.json_schema is not None and progress.completion_tokens == 0:
            return InvalidRequestError(
                "response_format: the JSON schema could not be compiled into an output constraint "
                "(too complex or unsupported); simplify the schema",
                param="response_format",
                code="invalid_json_schema",
            )
        return EngineError("the engine failed while generating")

    def _turn_events(self, turn: Turn, progress: _Progress) -> AsyncIterator[_Event]:
        if turn.refusal is not None:
            return self._refusal_events(turn)
        if turn.plan is None or not turn.plan.has_server_tools:
            events = self._step_events(turn, progress, turn.request_id, server=set())
        else:
            events = self._loop_events(turn, progress)
        if self.guard is not None and self.guard.has("output"):
            events = self._guard_output(turn, events)
        return events

    async def _gated(self, turn: Turn, progress: _Progress) -> AsyncIterator[_Event]:
        """Generation starts (prefill, first window) while the input rails decide; their
        verdict is awaited before the first event leaves. If they refuse or rewrite the
        input, that generation is dropped unseen and the turn restarts from their text."""
        assert turn.input_gate is not None and turn.gated_messages is not None
        events = self._turn_events(turn, progress)
        first = asyncio.ensure_future(anext(events, None))
        # Let the request reach the engine before the rails take the event loop (their
        # checks are CPU-bound Python and would otherwise run first, in series).
        before = self.engine.num_unfinished_requests()
        for _ in range(50):
            await asyncio.sleep(0)
            if first.done() or self.engine.num_unfinished_requests() > before:
                break
        try:
            verdicts = await self._run_checks(turn.input_gate)
        except BaseException:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await events.aclose()
            raise
        turn.input_gate = None
        changed = any(v.status != "passed" for v in verdicts.values())
        if not changed:
            turn.guard_events += [e for v in verdicts.values() for e in v.events]
            ev = await first
            while ev is not None:
                yield ev
                ev = await anext(events, None)
            return
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await events.aclose()
        progress.prompt_tokens = progress.completion_tokens = 0
        progress.first_token_at = None
        messages = self._apply_verdicts(turn, turn.gated_messages, verdicts)
        if turn.context is not None:
            turn.context.new_messages = messages
            if turn.refusal is not None:
                self._refuse_stateful(turn)
            else:
                # A rewritten input (an operator's transform rail): assemble again.
                turn.messages = await self._reassemble(turn)
                self._render_step(turn, turn.choice)
        else:
            turn.messages = messages
            self._render_step(turn, "none" if turn.refusal is not None else turn.choice)
        async for ev in self._turn_events(turn, progress):
            yield ev

    async def _reassemble(self, turn: Turn) -> list[dict[str, str]]:
        assert self.memory is not None and turn.context is not None
        return await self.memory.assemble(self.engine, turn.principal, turn.context, turn.reserve, turn.request_id)

    async def _events(self, turn: Turn, progress: _Progress) -> AsyncIterator[_Event]:
        output = TurnOutput() if turn.context is not None else None
        events = self._gated(turn, progress) if turn.input_gate is not None else self._turn_events(turn, progress)
        outcome = "client_disconnected"
        try:
            async for ev in events:
                if output is not None:
                    output.add(ev)
                yield ev
            self._e2e.observe(time.perf_counter() - turn.started)
            if self.guard is not None:
                await self._audit_guard(turn)
            if output is not None:
                await self._after_turn(turn, output, progress)
            outcome = "refused" if turn.refusal is not None else "completed"
        except Exception as exc:
            outcome = "error"
            if turn.telemetry is not None and turn.telemetry.trace is not None:
                turn.telemetry.trace.fail(exc, end=False)
            raise
        finally:
            await self.finish(turn, progress, outcome)

    async def _refusal_events(self, turn: Turn) -> AsyncIterator[_Event]:
        assert turn.refusal is not None
        for i in range(turn.params.n):
            yield _Event("text", i, turn.refusal.text)
            yield _Event("finish", i, text="content_filter")

    def _all_guard_events(self, turn: Turn) -> list[GuardEvent]:
        return turn.guard_events + (turn.context.guard_events if turn.context is not None else [])

    async def _audit_guard(self, turn: Turn) -> None:
        assert self.guard is not None
        events = self._all_guard_events(turn)
        for e in events:
            log.info("guardrails %s %s %s: %s (%s)", turn.request_id, e.stage, e.action, e.rail, e.reason)
        if events and self.guard.audit is not None:
            p = turn.principal
            await asyncio.to_thread(self.guard.audit.write, turn.request_id, p.tenant, p.user, events)

    async def _guard_output(self, turn: Turn, events: AsyncIterator[_Event]) -> AsyncIterator[_Event]:
        """Text through the output rails in checked windows (guard.OutputWindow), per
        choice. A blocked window ends its choice with the refusal and finish_reason
        "content_filter"; generation stops once every choice is done."""
        assert self.guard is not None
        system = next((m["content"] for m in turn.messages if m["role"] == "system"), "")
        windows: dict[int, OutputWindow] = {}

        def stopped(i: int) -> bool:
            return i in windows and windows[i].blocked

        async def release(i: int, final: bool) -> AsyncIterator[_Event]:
            w = windows.get(i)
            if w is None:
                return
            text, logprobs = await w.release(final)
            if w.blocked:
                assert w.verdict is not None
                turn.guard_events += w.events
                w.events = []
                yield _Event("text", i, ("\n\n" if w.released else "") + w.verdict.text)
                yield _Event("finish", i, text="content_filter")
            elif text or logprobs:
                turn.guard_events += w.events
                w.events = []
                yield _Event("text", i, text, logprobs)

        try:
            async for ev in events:
                i = ev.index
                if stopped(i):
                    continue
                if ev.kind == "text":
                    w = windows.setdefault(i, self.guard.output_window(system))
                    w.add(ev.text, ev.logprobs)
                    if w.due():
                        async for out in release(i, final=False):
                            yield out
                else:
                    # A tool call or the finish: the text before it is complete.
                    async for out in release(i, final=True):
                        yield out
                    if not stopped(i):
                        yield ev
                if sum(w.blocked for w in windows.values()) == turn.params.n:
                    break
        finally:
            await events.aclose()

    async def _after_turn(self, turn: Turn, output: TurnOutput, progress: _Progress) -> None:
        """Store a finished stateful turn (before the client hears it is done: a stored
        turn is acknowledged only once it is on disk)."""
        assert turn.context is not None and self.memory is not None
        response, items = turn.build_response(output, self.usage(progress)) if turn.build_response else (None, None)
        await self.memory.persist(turn.principal, turn.context, turn.request_id, self.model, output.message(), response, items)

    async def _step_events(self, turn: Turn, progress: _Progress, request_id: str, server: set[str], held: list | None = None) -> AsyncIterator[_Event]:
        """One generation. Text streams through; calls of client tools become call and
        argument events; calls of `server` tools are kept back in `held` (a list of
        parsers, one per choice) for the loop to run. A finish event ends each choice.

        The first call of a choice streams as it is generated; later ones are shown when
        complete, so that an exact repeat (a small model looping on "," after a call) can
        be dropped and its generation stopped instead of running to max_tokens."""
        constrained = turn.params.regex is not None
        n = turn.params.n
        parsers = [CallParser() for _ in range(n)]
        shown: list[dict[int, int]] = [{} for _ in range(n)]  # parser call index → message index
        done = [False] * n

        def show(i: int, k: int) -> _Event:
            shown[i][k] = len(shown[i])
            call = parsers[i].calls[k]
            return _Event("call", i, call=shown[i][k], call_id=call.id, name=call.name)

        def finish(i: int, reason: str) -> _Event:
            parser = parsers[i]
            if constrained and parser.is_calls and reason == "stop":
                reason = "tool_calls" if shown[i] else "stop"
            done[i] = True
            return _Event("finish", i, text=reason)

        # Closed as soon as every choice is done, not when collected: its cleanup (the
        # engine's slot, metrics, the engine time charged to the turn) must come first.
        generation = self._generate(turn, progress, request_id, stop_early=lambda: all(done))
        try:
            async for chunk in generation:
                i = chunk.index
                if done[i]:
                    continue
                if not constrained:
                    if chunk.text or chunk.logprobs:
                        yield _Event("text", i, chunk.text, chunk.logprobs)
                else:
                    parser = parsers[i]
                    delta = parser.feed(chunk.text)
                    if delta.text or (chunk.logprobs and not parser.is_calls):
                        yield _Event("text", i, delta.text, chunk.logprobs)
                    for call in delta.started:
                        k = parser.calls.index(call)
                        if k == 0 and call.name not in server:
                            yield show(i, k)
                    for k, fragment in delta.fragments:
                        if k in shown[i]:
                            yield _Event("args", i, fragment, call=shown[i][k])
                    for k in delta.completed:
                        call = parser.calls[k]
                        if k > 0 and parser.is_repeat(k):
                            call.duplicate = True
                            yield finish(i, "stop")
                            break
                        if k > 0 and call.name not in server:
                            yield show(i, k)
                            yield _Event("args", i, call.arguments, call=shown[i][k])
                if chunk.finish_reason is not None and not done[i]:
                    parser = parsers[i]
                    if constrained and parser.mode is None and parser.text:
                        yield _Event("text", i, parser.text)
                    yield finish(i, chunk.finish_reason)
                if all(done):
                    break
        finally:
            await generation.aclose()
        if held is not None:
            held.extend(parsers)

    async def _loop_events(self, turn: Turn, progress: _Progress) -> AsyncIterator[_Event]:
        """The server-side tool loop (n == 1): generate; if the model called server tools,
        run them, show it the results and generate again, up to max_tool_steps."""
        assert turn.plan is not None and self.executor is not None
        plan, executor = turn.plan, self.executor
        server = {t.name for t in plan.tools if t.server}
        first_choice = plan.choice
        async for ev in self._resolve_confirmation(turn):
            if ev is None:  # a confirmed action ran: let the model report its result
                first_choice = "none"
                continue
            yield ev
            return
        seen: set[tuple[str, str]] = set()  # calls already run this turn
        repeating = False
        for step in range(self.max_tool_steps):
            if step > 0 or first_choice != turn.choice:
                # The last step, or a model that repeats calls it has seen the results
                # of, must answer in prose now.
                last = step == self.max_tool_steps - 1 or repeating
                self._render_step(turn, "none" if last else (first_choice if step == 0 else plan.step_choice(step)))
            held: list[CallParser] = []
            finish: _Event | None = None
            async for ev in self._step_events(turn, progress, f"{turn.request_id}-{step}", server, held):
                if ev.kind == "finish":
                    finish = ev
                else:
                    yield ev
            assert finish is not None
            parser = held[0]
            calls = parser.finished_calls() if parser.is_calls and finish.text in ("stop", "tool_calls") else []
            server_calls = [c for c in calls if c.name in server]
            if not server_calls:
                yield finish
                return
            signatures = {(c.name, canonical_arguments(c.arguments)) for c in server_calls}
            repeating = signatures <= seen
            seen |= signatures
            ctx = ToolContext(turn.principal.tenant, turn.principal.user, turn.principal.key_id, turn.request_id, turn.messages)
            results = await executor.run([(c.id, c.name, c.arguments) for c in server_calls], turn.principal, ctx)
            for r in results:
                turn.guard_events += r.guard_events
            turn.server_calls.extend(results)
            shown_calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            turn.messages = turn.messages + [{"role": "assistant", "content": call_text(shown_calls)}]
            turn.messages += [{"role": "tool", "content": r.content} for r in results]
            if len(server_calls) < len(calls):  # the client has calls of its own to run
                yield dataclasses.replace(finish, text="tool_calls")
                return
            pending = [r.action for r in results if r.action is not None]
            if pending:
                turn.pending_action = public_action(pending[0])
                lines = [f"- {a['summary']} (action {a['id']})" for a in pending]
                yield _Event(
                    "text",
                    0,
                    "I need your confirmation before I do this:\n" + "\n".join(lines) + '\nReply "yes" to go ahead or "no" to cancel.',
                )
                yield _Event("finish", 0, text="stop")
                return

    async def _resolve_confirmation(self, turn: Turn) -> AsyncIterator[_Event | None]:
        """If the assistant last asked to confirm an action and the user has answered,
        run it (once, whatever the number of replays) or cancel it. Yields None when it
        ran and the loop should go on, or the final events of a decline."""
        assert self.executor is not None
        # The assembled messages, not the request's: in a stored conversation the
        # question was asked in an earlier request.
        msgs = turn.messages
        if len(msgs) < 2 or msgs[-1]["role"] != "user" or msgs[-2]["role"] != "assistant":
            return
        ref = _ACTION_REF.findall(msgs[-2]["content"] or "")
        if not ref:
            return
        try:
            row = await asyncio.to_thread(self.executor.get_action, ref[-1], turn.principal)
        except NotFoundError:
            return
        answer = msgs[-1]["content"] or ""
        if _AFFIRMATIVE.match(answer):
            try:
                row = await self.executor.approve(row["id"], turn.principal, request_id=turn.request_id, messages=turn.messages)
            except ConflictError:
                row = await asyncio.to_thread(self.executor.get_action, row["id"], turn.principal)
                turn.pending_action = public_action(row)
                yield _Event("text", 0, f"That action was {row['status']} earlier, so nothing was done: {row['summary']}.")
                yield _Event("finish", 0, text="stop")
                return
            turn.pending_action = public_action(row)
            call_id = "call_" + row["id"].removeprefix("act_")
            call = {"id": call_id, "function": {"name": row["tool"], "arguments": row["arguments"]}}
            result = row["result"] or ""
            if self.guard is not None and row["status"] == "succeeded":
                # The confirmed tool's result is data like any other tool's.
                result, events = await self.guard.tool_result(result)
                turn.guard_events += events
            turn.messages = turn.messages + [
                {"role": "assistant", "content": call_text([call])},
                {"role": "tool", "content": result},
            ]
            yield None
            return
        if row["status"] == "pending":
            row = await asyncio.to_thread(self.executor.cancel, row["id"], turn.principal)
            turn.pending_action = public_action(row)
            yield _Event("text", 0, f"Cancelled; nothing was done: {row['summary']}.")
            yield _Event("finish", 0, text="stop")

    # ------------------------------------------------------------ response shapes

    def usage(self, progress: _Progress) -> Usage:
        return Usage(
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            total_tokens=progress.prompt_tokens + progress.completion_tokens,
        )

    @staticmethod
    def cost_info(tele: TurnTelemetry) -> dict[str, Any]:
        info: dict[str, Any] = {"engine_seconds": round(tele.charge.engine_seconds, 6), "usd": tele.cost_usd}
        if tele.charge.capped:
            info["capped_by_budget"] = True
        return info

    def extensions(self, turn: Turn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if turn.server_calls:
            out["server_tool_calls"] = [r.public() for r in turn.server_calls]
        if turn.pending_action is not None:
            out["pending_action"] = turn.pending_action
        if self.guard is not None:
            out["guardrails"] = [e.public() for e in self._all_guard_events(turn)]
        tele = turn.telemetry
        if tele is not None and tele.cost_usd is not None:
            out["cost"] = self.cost_info(tele)
        if turn.route is not None:
            out["routing"] = turn.route.public()
        ctx = turn.context
        if ctx is not None:
            if ctx.thread is not None:
                out["conversation"] = ctx.thread.conversation_id
            if ctx.window is not None:
                out["context_window"] = ctx.window.info()
            out["recalled_memories"] = [m.public() for m in ctx.recalled]
            out["citations"] = ctx.citations()
        return out

    @staticmethod
    def _fold(ev: _Event, texts: list[str], calls: list[list[dict[str, str]]], finish: list[str | None], logprobs: list[list[TokenLogprob]]) -> None:
        if ev.kind == "text":
            texts[ev.index] += ev.text
            if ev.logprobs:
                logprobs[ev.index].extend(ev.logprobs)
        elif ev.kind == "call":
            calls[ev.index].append({"id": ev.call_id, "name": ev.name, "arguments": ""})
        elif ev.kind == "args":
            calls[ev.index][ev.call]["arguments"] += ev.text
        else:
            finish[ev.index] = ev.text

    async def complete(self, turn: Turn) -> ChatCompletion:
        n = turn.params.n
        texts = [""] * n
        calls: list[list[dict[str, str]]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        progress = _Progress()
        try:
            async for ev in self._events(turn, progress):
                self._fold(ev, texts, calls, finish, logprobs)
        finally:
            await self.finish(turn, progress, "client_disconnected")
        want_logprobs = turn.params.logprobs is not None
        return ChatCompletion(
            id=turn.request_id,
            created=turn.created,
            model=turn.request.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(
                        content=texts[i] if texts[i] or not calls[i] else None,
                        tool_calls=[ToolCall(id=c["id"], function={"name": c["name"], "arguments": c["arguments"]}) for c in calls[i]] or None,
                    ),
                    logprobs=ChoiceLogprobs(content=[TokenLogprobOut.model_validate(x) for x in logprobs_out(logprobs[i])]) if want_logprobs else None,
                    finish_reason=finish[i],
                )
                for i in range(n)
            ],
            usage=self.usage(progress),
            **self.extensions(turn),
        )

    def event_stream(self, turn: Turn) -> tuple[_Progress, AsyncIterator[_Event]]:
        """The turn's events, for API shapes other than chat completions (Responses)."""
        progress = _Progress()
        return progress, self._events(turn, progress)

    async def open_stream(self, turn: Turn) -> AsyncIterator[str]:
        """Start generating and return the SSE body; errors before the first event raise."""
        progress = _Progress()
        events = self._events(turn, progress)
        return self._sse(turn, progress, events, await first_event(events))

    async def _sse(self, turn: Turn, progress: _Progress, events: AsyncIterator[_Event], first: _Event | None) -> AsyncIterator[str]:
        include_usage = bool(turn.request.stream_options and turn.request.stream_options.include_usage)
        model = turn.request.model

        def event(choices: list[dict], usage: Usage | None = None, extra: dict | None = None) -> str:
            body = chunk_json(turn.request_id, turn.created, model, choices, usage)
            if include_usage and usage is None:
                body["usage"] = None
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        try:
            yield event([chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(turn.params.n)])
            ev = first
            while ev is not None:
                if ev.kind == "text":
                    yield event([chunk_choice(ev.index, {"content": ev.text}, None, ev.logprobs)])
                elif ev.kind == "call":
                    call = {"index": ev.call, "id": ev.call_id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
                    yield event([chunk_choice(ev.index, {"tool_calls": [call]})])
                elif ev.kind == "args":
                    yield event([chunk_choice(ev.index, {"tool_calls": [{"index": ev.call, "function": {"arguments": ev.text}}]})])
                else:
                    yield event([chunk_choice(ev.index, {}, ev.text)], extra=self.extensions(turn))
                ev = await anext(events, None)
            # The events are exhausted, so the turn is settled: the usage chunk carries its cost.
            if include_usage:
                tele = turn.telemetry
                yield event([], self.usage(progress), {"cost": self.cost_info(tele)} if tele is not None and tele.cost_usd is not None else None)
        except EnclaveError as exc:
            # Headers are gone; OpenAI clients raise on an `error` event in the stream.
            yield f"data: {json.dumps(exc.to_body())}\n\n"
        finally:
            await events.aclose()
            await self.finish(turn, progress, "client_disconnected")
        yield "data: [DONE]\n\n"
