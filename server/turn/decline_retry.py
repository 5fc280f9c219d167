"""The decline stage: an answer that declines, in its opening, a request the rails judged
clearly benign is continued with the phrases of declining ruled out (and the decline's
own opening word, when those phrases did not cover it: `DeclinePolicy.avoid_after`).

Policy and judgement are `server/declines.py` (configured in `rails/config.yml`). Only a
plain text answer of one choice is judged: a constrained answer (tool calls, JSON) cannot
decline in words, and n > 1 asks for samples as they come. Only text where a decline may
still be starting is held; everything before it streams as it comes, and nothing shown is
taken back: the retry is the turn's own generation, under a new engine request id, going
on from the shown text (the engine's own tokens of it, so its prefix cache serves them)
within the tokens the answer has left. Both generations' tokens count in its usage and
cost, since both ran. The retry is reported as a guardrail event ("model declines",
"retried") and counted in `enclave_rail_verdicts`; a decline that stands (the request was
in the rails' uncertain band) is counted as "kept".

With the policy's `prevent`, the answer's generation starts at once with the declining
phrases ruled out, while the request's harmful-intent score is computed (the input rails
compute the same one, for the same text, so it is shared). Before its first event is
released: a request below `retry_below` keeps it (counted as "prevented"); one in the
uncertain band, whose decline would stand, has it dropped unseen and generated anew
without the rule, and streams without being held. A decline in other words is still
retried as above.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncIterator

from server.declines import DeclinePolicy, Judgement, Scan
from server.guard import Guard, GuardEvent, Stage
from server.telemetry.metrics import Metrics
from server.turn.ahead import Ahead
from server.turn.events import Kind, TurnEvent
from server.turn.generation import Generation
from server.turn.state import Progress, Turn

RAIL = "model declines"
log = logging.getLogger(__name__)


class DeclineRetry:
    def __init__(self, guard: Guard, policy: DeclinePolicy, generation: Generation, metrics: Metrics):
        self.guard = guard
        self.policy = policy
        self.generation = generation
        self._verdicts = {o: metrics.rail_verdicts.labels(stage=Stage.OUTPUT.value, rail=RAIL, verdict=o) for o in ("retried", "kept", "prevented")}

    @staticmethod
    def applies(turn: Turn) -> bool:
        params = turn.step.params
        return params.n == 1 and params.regex is None and params.json_schema is None and not params.bad_words

    async def events(self, turn: Turn, progress: Progress, first: AsyncIterator[TurnEvent] | None = None) -> AsyncIterator[TurnEvent]:
        """The answer's events, a decline in its opening retried. `first`: its generation
        (by default this stage starts it, preventing declines where the policy says so)."""
        harm: asyncio.Future[float | None] | None = None  # the request's P(harmful), once asked
        if first is None:
            first, harm = await self._start(turn, progress)
        # Generated with `avoid` ruled out: only declines in other words are looked for.
        prevented = bool(turn.step.params.bad_words)
        # Known to be in the uncertain band: a decline would stand, so nothing is held for
        # one (the opening is still judged, to count a decline kept).
        keeping = harm is not None and harm.done() and self._uncertain(harm.result())
        held: list[TurnEvent] = []  # not yet shown: a decline may be starting in them
        shown = ""  # text of the events shown
        shown_ids: list[int] = []  # their tokens, as the engine generated them
        judging = True
        try:
            async for ev in first:
                if not judging:
                    yield ev
                    continue
                held.append(ev)
                text = shown + "".join(h.text for h in held if h.kind is Kind.TEXT)
                if ev.kind is Kind.TEXT:
                    scan = self.policy.scan(text, final=False, prevented=prevented)
                elif ev.kind is Kind.FINISH:
                    scan = self.policy.scan(text, final=True, prevented=prevented)
                else:
                    scan = Scan(Judgement.ANSWER, len(text))  # a call: not an answer in words
                # What cannot be part of a decline goes out now, in order.
                while held and (keeping or held[0].kind is not Kind.TEXT or len(shown) + len(held[0].text) <= scan.releasable):
                    h = held.pop(0)
                    if h.kind is Kind.TEXT:
                        shown += h.text
                        shown_ids += h.token_ids
                    yield h
                if scan.judgement is Judgement.DECLINE and await self._retry(turn, text, harm):
                    avoid = self.policy.avoid_after(text[scan.releasable :])
                    progress.superseding = True  # the retry takes its place
                    break
                if scan.judgement is not Judgement.UNDECIDED:
                    judging = False  # the opening is judged: the rest streams as it comes
                    for h in held:
                        yield h
                    held = []
            else:
                for h in held:  # the stream ended without a finish (a closed engine)
                    yield h
                return
        finally:
            try:
                await first.aclose()  # type: ignore[attr-defined]  # frees the engine's slot now
            finally:
                progress.superseding = False
        # The retry goes on from what the client has seen (nothing shown is taken back),
        # within what is left of the answer's token budget.
        step = turn.step
        step.prompt_token_ids = [*step.prompt_token_ids, *shown_ids]
        step.params = dataclasses.replace(step.params, bad_words=avoid, max_tokens=max(1, step.params.max_tokens - len(shown_ids)))
        async for ev in self.generation.step_events(turn, progress, f"{turn.engine_request_id}-d", server=set()):
            yield ev

    async def _start(self, turn: Turn, progress: Progress) -> tuple[AsyncIterator[TurnEvent], asyncio.Future[float | None] | None]:
        """The answer's generation, and the request's P(harmful) when it was needed."""
        if not self.policy.prevent:
            return self.generation.step_events(turn, progress, turn.engine_request_id, server=set()), None
        plain = turn.step.params
        turn.step.params = dataclasses.replace(plain, bad_words=self.policy.avoid)
        # Submitted first, so that prefill starts now.
        ahead = Ahead(self.generation.step_events(turn, progress, turn.engine_request_id, server=set()))
        harm = asyncio.ensure_future(self._p_harmful(turn))
        try:
            p = await asyncio.shield(harm)
        except BaseException:
            harm.cancel()
            await ahead.aclose()
            raise
        if not self._uncertain(p):
            self._verdicts["prevented"].inc()
            return ahead, harm
        # The model's own decline stands in the uncertain band: it may not be ruled out.
        # Both generations' tokens count, as in a retry (the first one's prefill ran).
        await ahead.supersede(progress)
        turn.step.params = plain
        return self.generation.step_events(turn, progress, f"{turn.engine_request_id}-u", server=set()), harm

    def _uncertain(self, p: float | None) -> bool:
        return p is not None and p >= self.policy.retry_below

    async def _p_harmful(self, turn: Turn) -> float | None:
        asked = next((m["content"] for m in reversed(turn.step.messages) if m["role"] == "user" and m.get("content")), "")
        try:
            return await self.guard.p_harmful(asked) if asked else None
        except Exception:
            # Not knowing is not "benign": the model's own declines stand (the input
            # rails, which need the same score, decide what happens to the turn).
            log.warning("model declines: no harmful-intent score; nothing is ruled out or retried", exc_info=True)
            return math.inf

    async def _retry(self, turn: Turn, text: str, harm: asyncio.Future[float | None] | None) -> bool:
        """Whether a decline is retried (and reported so); else it is kept (counted)."""
        p = await (harm if harm is not None else self._p_harmful(turn))
        if self._uncertain(p):
            self._verdicts["kept"].inc()
            return False
        self._verdicts["retried"].inc()
        benign = "no harmful-intent score" if p is None else f"P(harmful)={p:.2f} < {self.policy.retry_below}"
        turn.guards.add([GuardEvent(Stage.OUTPUT.value, RAIL, "retried", f"{self.policy.reason(text)}; {benign}")])
        return True
