"""The generation stage: one engine call with its metrics and abort-on-exit, and one
step's events (text, client tool calls streamed, server tool calls held for the loop)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.engine.base import Engine, GenerationChunk
from server.telemetry.metrics import Metrics
from server.toolcalls.closing import close
from server.toolcalls.format import CallParser
from server.turn.events import Kind, TurnEvent
from server.turn.prompt import Prompt
from server.turn.state import Progress, Turn


class Generation:
    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self.model = engine.served_model
        # Label children resolved once: the per-token path should not hash label dicts.
        self._tokens_out = metrics.generation_tokens.labels(model=self.model)
        self._tokens_in = metrics.prompt_tokens.labels(model=self.model)
        self._running = metrics.running.labels(model=self.model)
        self._ttft = metrics.ttft.labels(model=self.model)
        self._tpot = metrics.tpot.labels(model=self.model)

    async def generate(self, turn: Turn, progress: Progress, request_id: str, stop_early: Callable[[], bool] = lambda: False) -> AsyncIterator[GenerationChunk]:
        """The engine stream with metrics and abort-on-exit wrapped around it.
        `stop_early()` true at exit means the caller stopped on purpose (a looping model)."""
        step = turn.step
        self._running.inc()
        self._tokens_in.inc(len(step.prompt_token_ids))
        progress.prompt_tokens += len(step.prompt_token_ids)
        step_finished: set[int] = set()
        stream = self.engine.generate(request_id, step.prompt_token_ids, step.params)
        step_first: float | None = None
        step_tokens = 0
        try:
            async for chunk in stream:
                if chunk.token_ids:
                    now = time.perf_counter()
                    if progress.first_token_at is None:
                        progress.first_token_at = now
                        self._ttft.observe(progress.first_token_at - turn.req.started)
                    if step_first is None:
                        step_first = now
                    step_tokens += len(chunk.token_ids)
                    step_last = now
                    progress.completion_tokens += len(chunk.token_ids)
                    self._tokens_out.inc(len(chunk.token_ids))
                if chunk.finish_reason == "error":
                    raise Prompt.engine_failure(turn, progress)
                if chunk.finish_reason is not None:
                    step_finished.add(chunk.index)
                    self.metrics.finished.labels(model=self.model, finish_reason=chunk.finish_reason).inc()
                yield chunk
        finally:
            self._running.dec()
            if step_first is not None and step_tokens > step.params.n:
                # Decode pace: the first token of each choice is prefill's, not decode's.
                self._tpot.observe((step_last - step_first) / (step_tokens - step.params.n))
            if len(step_finished) < step.params.n:
                # The client went away (or we failed): free the engine's slot now rather
                # than letting it generate tokens nobody will read.
                await self.engine.abort(request_id)
                reason = "repeated_tool_call" if stop_early() else "superseded" if progress.superseding else "client_disconnected"
                self.metrics.aborted.labels(model=self.model, reason=reason).inc()
            await stream.aclose()

    async def step_events(
        self, turn: Turn, progress: Progress, request_id: str, server: set[str], held: list[CallParser] | None = None
    ) -> AsyncIterator[TurnEvent]:
        """One generation. Text streams through; calls of client tools become call and
        argument events; calls of `server` tools are kept back in `held` (a list of
        parsers, one per choice) for the loop to run. A finish event ends each choice.

        The first call of a choice streams as it is generated; later ones are shown when
        complete, so that an exact repeat (a small model looping on "," after a call) can
        be dropped and its generation stopped instead of running to max_tokens."""
        steps = _StepParsers(turn.step.params.n, constrained=turn.step.params.regex is not None, server=server, schemas=turn.step.call_schemas)
        # Closed as soon as every choice is done, not when collected: its cleanup (the
        # engine's slot, metrics, the engine time charged to the turn) must come first.
        generation = self.generate(turn, progress, request_id, stop_early=steps.all_done)
        try:
            async for chunk in generation:
                if steps.done[chunk.index]:
                    continue
                for ev in steps.feed(chunk):
                    yield ev
                if steps.all_done():
                    break
        finally:
            await generation.aclose()
        if held is not None:
            held.extend(steps.parsers)


class _StepParsers:
    """Per choice: the call parser, which calls were shown under which message index,
    and whether the choice is done."""

    def __init__(self, n: int, constrained: bool, server: set[str], schemas: dict[str, dict[str, Any]] | None = None):
        self.constrained = constrained
        self.server = server
        self.schemas = schemas or {}
        self.closed = [False] * n  # a call cut by max_tokens was closed (close_cut_call)
        self.parsers = [CallParser() for _ in range(n)]
        self.shown: list[dict[int, int]] = [{} for _ in range(n)]  # parser call index → message index
        self.done = [False] * n
        # Tokens of a chunk with no text yet (a character still incomplete), carried to
        # the next text event so that its tokens are the text's.
        self.unshown: list[tuple[int, ...]] = [() for _ in range(n)]

    def all_done(self) -> bool:
        return all(self.done)

    def show(self, i: int, k: int) -> TurnEvent:
        self.shown[i][k] = len(self.shown[i])
        call = self.parsers[i].calls[k]
        return TurnEvent(Kind.CALL, i, call=self.shown[i][k], call_id=call.id, name=call.name)

    def close_cut_call(self, i: int) -> list[TurnEvent]:
        """Cut by max_tokens in the middle of a client's call that is already streaming:
        its arguments are closed with the fewest characters its schema accepts (appended,
        so the stream stays consistent), or, when no tail makes them valid, the call is
        not completed and the client gets the text it was sent so far. The finish reason
        stays "length": a value may have been cut short. A server tool's cut call is never
        run (the loop runs finished calls only)."""
        parser = self.parsers[i]
        if not parser.calls or parser.calls[-1].complete:
            return []
        k = len(parser.calls) - 1
        call = parser.calls[k]
        schema = self.schemas.get(call.name)
        if k not in self.shown[i] or schema is None:
            return []
        tail = close(call.arguments, schema)
        if tail is None:
            return []
        call.arguments += tail
        call.complete = True
        self.closed[i] = True
        return [TurnEvent(Kind.ARGS, i, tail, call=self.shown[i][k])] if tail else []

    def finish(self, i: int, reason: str) -> TurnEvent:
        parser = self.parsers[i]
        if self.constrained and parser.is_calls and reason == "stop":
            reason = "tool_calls" if self.shown[i] else "stop"
        elif (
            self.constrained and parser.is_calls and reason == "length" and self.shown[i] and not self.closed[i]
            and all(parser.calls[k].complete for k in self.shown[i])
        ):
            # Cut while writing one more call, which was never shown: the calls the
            # client got are whole, and are what it should run.
            reason = "tool_calls"
        self.done[i] = True
        return TurnEvent.finish(i, reason)

    def feed(self, chunk: GenerationChunk) -> list[TurnEvent]:
        i = chunk.index
        out: list[TurnEvent] = []
        parser = self.parsers[i]
        if not self.constrained:
            ids = self.unshown[i] + tuple(chunk.token_ids)
            if chunk.text or chunk.logprobs:
                out.append(TurnEvent(Kind.TEXT, i, chunk.text, chunk.logprobs, token_ids=ids))
                ids = ()
            self.unshown[i] = ids
        else:
            delta = parser.feed(chunk.text)
            if delta.text or (chunk.logprobs and not parser.is_calls):
                out.append(TurnEvent(Kind.TEXT, i, delta.text, chunk.logprobs))
            for call in delta.started:
                k = parser.calls.index(call)
                if k == 0 and call.name not in self.server:
                    out.append(self.show(i, k))
            for k, fragment in delta.fragments:
                if k in self.shown[i]:
                    out.append(TurnEvent(Kind.ARGS, i, fragment, call=self.shown[i][k]))
            for k in delta.completed:
                call = parser.calls[k]
                if k > 0 and parser.is_repeat(k):
                    call.duplicate = True
                    out.append(self.finish(i, "stop"))
                    return out
                if k > 0 and call.name not in self.server:
                    out.append(self.show(i, k))
                    out.append(TurnEvent(Kind.ARGS, i, call.arguments, call=self.shown[i][k]))
        if chunk.finish_reason is not None and not self.done[i]:
            if self.constrained and parser.mode is None and parser.text:
                out.append(TurnEvent(Kind.TEXT, i, parser.text))
            if self.constrained and parser.is_calls and chunk.finish_reason == "length":
                out += self.close_cut_call(i)
            out.append(self.finish(i, chunk.finish_reason))
        return out
