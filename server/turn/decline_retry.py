"""The decline stage: an answer that opens by declining a request the rails judged
clearly benign is generated once more, with the phrases of declining ruled out.

Policy and judgement are `server/declines.py` (configured in `rails/config.yml`). Only a
plain text answer of one choice is judged: a constrained answer (tool calls, JSON) cannot
decline in words, and n > 1 asks for samples as they come. While the opening may still
turn into a decline its text is held (nothing else is: an opening that cannot decline
streams at once). The retry is the turn's own generation under a new engine request id;
both generations' tokens count in its usage and cost, since both ran. The retry is
reported as a guardrail event ("model declines", "retried") and counted in
`enclave_rail_verdicts`; a decline that stands (the request was in the rails' uncertain
band) is counted as "kept".
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from server.declines import DeclinePolicy, Judgement
from server.guard import Guard, GuardEvent, Stage
from server.telemetry.metrics import Metrics
from server.turn.events import Kind, TurnEvent
from server.turn.generation import Generation
from server.turn.state import Progress, Turn

RAIL = "model declines"


class DeclineRetry:
    def __init__(self, guard: Guard, policy: DeclinePolicy, generation: Generation, metrics: Metrics):
        self.guard = guard
        self.policy = policy
        self.generation = generation
        self._verdicts = {o: metrics.rail_verdicts.labels(stage=Stage.OUTPUT.value, rail=RAIL, verdict=o) for o in ("retried", "kept")}

    @staticmethod
    def applies(turn: Turn) -> bool:
        params = turn.step.params
        return params.n == 1 and params.regex is None and params.json_schema is None and not params.bad_words

    async def events(self, turn: Turn, progress: Progress, first: AsyncIterator[TurnEvent]) -> AsyncIterator[TurnEvent]:
        held: list[TurnEvent] = []
        text = ""
        judgement = Judgement.UNDECIDED
        try:
            async for ev in first:
                if judgement is not Judgement.UNDECIDED:
                    yield ev
                    continue
                held.append(ev)
                if ev.kind is Kind.TEXT:
                    text += ev.text
                    judgement = self.policy.judge(text, final=False)
                elif ev.kind is Kind.FINISH:
                    judgement = self.policy.judge(text, final=True)
                else:
                    judgement = Judgement.ANSWER  # a call: not an answer in words
                if judgement is Judgement.DECLINE and await self._retry(turn, text):
                    break
                if judgement is not Judgement.UNDECIDED:
                    judgement = Judgement.ANSWER  # released from here on, as it comes
                    for h in held:
                        yield h
                    held = []
            else:
                for h in held:  # the stream ended without a finish (a closed engine)
                    yield h
                return
        finally:
            await first.aclose()  # type: ignore[attr-defined]  # frees the engine's slot now
        turn.step.params = dataclasses.replace(turn.step.params, bad_words=self.policy.avoid)
        async for ev in self.generation.step_events(turn, progress, f"{turn.engine_request_id}-d", server=set()):
            yield ev

    async def _retry(self, turn: Turn, text: str) -> bool:
        """Whether a decline is retried (and reported so); else it is kept (counted)."""
        asked = next((m["content"] for m in reversed(turn.step.messages) if m["role"] == "user" and m.get("content")), "")
        p = await self.guard.p_harmful(asked) if asked else None
        if p is not None and p >= self.policy.retry_below:
            self._verdicts["kept"].inc()
            return False
        self._verdicts["retried"].inc()
        benign = "no harmful-intent score" if p is None else f"P(harmful)={p:.2f} < {self.policy.retry_below}"
        turn.guards.add([GuardEvent(Stage.OUTPUT.value, RAIL, "retried", f"{self.policy.reason(text)}; {benign}")])
        return True
