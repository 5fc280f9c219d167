"""The input gate: the new user message through the input rails and new tool results
through the tool-result rails, before memory, retrieval, logs or the model see them.

One exception changes nothing they see: when the new input is a user message and no
server tool (nor a workflow's node) can run, the verdict is left pending (`PendingGate`)
and generation starts alongside the rails, on the message with its personal data masked
(what the PII rail makes of it); nothing is released, stored or run until the verdict is
in (`gated`). If the rails refuse, or pass a text other than the one generated from,
that generation is dropped unseen and the turn restarts from their text, so the model
reads exactly what the rails would have passed to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from server.engine.base import Engine
from server.guard import Guard, Stage, Verdict
from server.telemetry.redaction import mask_pii
from server.turn.ahead import Ahead
from server.turn.events import TurnEvent
from server.turn.state import Progress, Turn

# By message index: (stage, text, rail context).
Checks = dict[int, tuple[Stage, str, dict | None]]


@dataclass
class PendingGate:
    checks: Checks
    messages: list[dict[str, str]]  # as they came, before any verdict
    generated_from: dict[int, str]  # by message index: the text generation started on


class InputGate:
    def __init__(self, guard: Guard, engine: Engine):
        self.guard = guard
        self.engine = engine  # to see the gated generation reach it

    @staticmethod
    def checks(turn: Turn, messages: list[dict[str, str]]) -> Checks:
        """The rail checks a turn's new input needs, by message index."""
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        checks: Checks = {}
        plan = turn.req.plan
        if last_user >= 0 and messages[last_user].get("content"):
            # The caller's own tools are in scope for the off-topic rail: an app that
            # declares book_flight has made flights its users' topic.
            tools = [f"{t.name.replace('_', ' ')}: {t.description}" for t in plan.tools if not t.server] if plan else []
            checks[last_user] = (Stage.INPUT, messages[last_user]["content"], {"extra_topics": tools} if tools else None)
        for i, m in enumerate(messages):
            if m["role"] == "tool" and i > last_assistant and m.get("content"):
                checks[i] = (Stage.TOOL_RESULT, m["content"], None)
        return checks

    async def run(self, checks: Checks) -> dict[int, Verdict]:
        verdicts = await asyncio.gather(*(self.guard.check(stage, text, ctx) for stage, text, ctx in checks.values()))
        return dict(zip(checks, verdicts, strict=True))

    @staticmethod
    def apply(turn: Turn, messages: list[dict[str, str]], verdicts: dict[int, Verdict]) -> list[dict[str, str]]:
        """The messages as the model may see them: checked ones as their rails left them
        (masked, neutralised; a refused one masked), personal data masked in the rest of
        the history the client sent."""
        out = []
        for i, m in enumerate(messages):
            v = verdicts.get(i)
            if v is not None:
                turn.guards.add(v.events)
                if v.blocked:
                    turn.report.refusal = v
                    m = {**m, "content": mask_pii(m["content"])[0]}
                else:
                    m = {**m, "content": v.text}
            elif m["role"] != "system" and m.get("content"):
                m = {**m, "content": mask_pii(m["content"])[0]}
            out.append(m)
        return out

    async def check(self, turn: Turn, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The turn's messages after the input-side rails, or (see the module) as they
        will be if the rails pass them, with the verdict left pending on `turn.gate`."""
        checks = self.checks(turn, messages)
        if not checks:
            return self.apply(turn, messages, {})
        # Only a user message is checked alongside: tool results are data the model must
        # not read before their instructions are removed.
        user_only = all(messages[i]["role"] == "user" for i in checks)
        plan = turn.req.plan
        if user_only and (plan is None or not plan.has_server_tools) and turn.workflow is None:
            # Personal data masked, as the rails mask it (unless they are configured for
            # fewer kinds, or rewrite: then the verdict's text differs and the turn restarts).
            ahead = self.apply(turn, messages, {})
            turn.gate = PendingGate(checks, messages, {i: ahead[i]["content"] for i in checks})
            return ahead
        return self.apply(turn, messages, await self.run(checks))

    async def gated(
        self,
        turn: Turn,
        progress: Progress,
        events: Callable[[], AsyncIterator[TurnEvent]],
        restart: Callable[[list[dict[str, str]]], Awaitable[None]],
    ) -> AsyncIterator[TurnEvent]:
        """`events()` started while the rails decide; their verdict is awaited before the
        first event leaves. On a refusal or rewrite, `restart(messages)` prepares the turn
        again from the rails' text and `events()` runs anew."""
        gate = turn.gate
        assert gate is not None
        ahead = Ahead(events())
        # Let the request reach the engine before the rails take the event loop (their
        # checks are CPU-bound Python and would otherwise run first, in series).
        before = self.engine.num_unfinished_requests()
        for _ in range(50):
            await asyncio.sleep(0)
            if ahead.first.done() or self.engine.num_unfinished_requests() > before:
                break
        try:
            verdicts = await self.run(gate.checks)
        except BaseException:
            await ahead.aclose()
            raise
        turn.gate = None
        if all(not v.blocked and v.text == gate.generated_from[i] for i, v in verdicts.items()):
            turn.guards.add([e for v in verdicts.values() for e in v.events])
            async for ev in ahead:
                yield ev
            return
        await ahead.supersede(progress)
        progress.reset()
        turn.attempt += 1
        await restart(self.apply(turn, gate.messages, verdicts))
        async for ev in events():
            yield ev

