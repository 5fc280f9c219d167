"""The tool loop (n == 1): generate; if the model called server tools, run them, show it
the results and generate again, up to max_tool_steps (think → call → observe).

A destructive tool does not run in the loop: the executor makes it a pending action and
the turn pauses on a `Confirmation`, which the user answers in the next turn. The pause
is resolved at the start of that turn (`resolve`): an explicit yes runs the action once
and the loop goes on with its result; anything else cancels it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.errors import ConflictError, NotFoundError
from server.guard import Guard
from server.toolcalls.executor import Executor, public_action
from server.toolcalls.format import CallParser, call_text, canonical_arguments
from server.toolcalls.registry import ToolContext
from server.turn.events import Kind, TurnEvent
from server.turn.generation import Generation
from server.turn.prompt import Prompt
from server.turn.state import Progress, Turn

_ACTION_REF = re.compile(r"\bact_[0-9a-f]{24}\b")
# A confirmation must be explicit; anything else declines (the safe reading).
AFFIRMATIVE = re.compile(r"^\s*(yes|y|yeah|yep|confirm(ed)?|approve(d)?|go ahead|proceed|do it|ok(ay)?|sure)\b", re.IGNORECASE)


@dataclass
class Confirmation:
    """A named pause: the turn ends waiting for the user to approve these actions."""

    actions: list[dict[str, Any]]

    def text(self) -> str:
        lines = [f"- {a['summary']} (action {a['id']})" for a in self.actions]
        return "I need your confirmation before I do this:\n" + "\n".join(lines) + '\nReply "yes" to go ahead or "no" to cancel.'


def _said(text: str) -> list[TurnEvent]:
    """A turn that ends with the server's own words."""
    return [TurnEvent(Kind.TEXT, 0, text), TurnEvent.finish(0, "stop")]


class ToolLoop:
    def __init__(self, executor: Executor, generation: Generation, prompt: Prompt, guard: Guard | None, max_steps: int):
        self.executor = executor
        self.generation = generation
        self.prompt = prompt
        self.guard = guard
        self.max_steps = max_steps

    async def events(self, turn: Turn, progress: Progress) -> AsyncIterator[TurnEvent]:
        plan = turn.req.plan
        assert plan is not None
        server = {t.name for t in plan.tools if t.server}
        first_choice = turn.first_choice or plan.choice
        ends, ran = await self.resolve(turn)
        if ends is not None:
            for ev in ends:
                yield ev
            return
        if ran:
            first_choice = "none"  # a confirmed action ran: let the model report its result
        seen: set[tuple[str, str]] = set()  # calls already run this turn
        repeating = False
        for step in range(self.max_steps):
            if step > 0 or first_choice != turn.step.tool_choice:
                # The last step, or a model that repeats calls it has seen the results
                # of, must answer in prose now.
                last = step == self.max_steps - 1 or repeating
                self.prompt.render(turn, "none" if last else (first_choice if step == 0 else plan.step_choice(step)))
            held: list[CallParser] = []
            finish: TurnEvent | None = None
            async for ev in self.generation.step_events(turn, progress, f"{turn.request_id}-{step}", server, held):
                if ev.kind is Kind.FINISH:
                    finish = ev
                else:
                    yield ev
            assert finish is not None
            parser = held[0]
            # Cut by max_tokens, the calls completed before the cut still stand (a small
            # model repeats a call until it runs out): only the unfinished one is dropped.
            calls = parser.finished_calls() if parser.is_calls and finish.text in ("stop", "tool_calls", "length") else []
            server_calls = [c for c in calls if c.name in server]
            if not server_calls:
                yield finish
                return
            fresh = self._may_run(turn, server_calls)
            if not fresh and len(server_calls) == len(calls):
                repeating = True  # nothing new to run: the model answers now
                continue
            calls = [c for c in calls if c.name not in server or c in fresh]
            server_calls = fresh
            signatures = {(c.name, canonical_arguments(c.arguments)) for c in server_calls}
            repeating = signatures <= seen
            seen |= signatures
            pending = await self._run(turn, calls, server_calls)
            if len(server_calls) < len(calls):  # the client has calls of its own to run
                yield dataclasses.replace(finish, text="tool_calls")
                return
            if pending:
                turn.report.pending_action = public_action(pending[0])
                for ev in _said(Confirmation(pending).text()):
                    yield ev
                return

    def _may_run(self, turn: Turn, calls: list[Any]) -> list[Any]:
        """The calls that may run. A tool that is not idempotent (a hand-off, a message
        sent) does its work once a turn: a small model calls it again, worded
        differently, after seeing it done."""
        done = {r.name for r in turn.report.server_calls if r.status in ("ok", "pending_confirmation")}
        out = []
        for call in calls:
            tool = self.executor.registry.tools.get(call.name)
            if tool is not None and not tool.idempotent:
                if call.name in done:
                    continue
                done.add(call.name)
            out.append(call)
        return out

    async def _run(self, turn: Turn, calls: list[Any], server_calls: list[Any]) -> list[dict[str, Any]]:
        """Run the server calls and show the model their results; returns the actions
        that wait for the user's confirmation."""
        p = turn.req.principal
        plan = turn.req.plan
        ctx = ToolContext(p.tenant, p.user, p.key_id, turn.request_id, turn.step.messages, mcp_headers=plan.mcp_headers if plan is not None else {})
        results = await self.executor.run([(c.id, c.name, c.arguments) for c in server_calls], p, ctx, plan.confirm if plan is not None else ())
        for r in results:
            turn.guards.add(r.guard_events)
        turn.report.server_calls.extend(results)
        shown_calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        turn.step.messages = turn.step.messages + [{"role": "assistant", "content": call_text(shown_calls)}]
        turn.step.messages += [{"role": "tool", "content": r.content} for r in results]
        return [r.action for r in results if r.action is not None]

    async def resolve(self, turn: Turn) -> tuple[list[TurnEvent] | None, bool]:
        """If the assistant last asked to confirm an action and the user has answered,
        run it (once, whatever the number of replays) or cancel it. Returns the final
        events of a decline (or None to go on), and whether a confirmed action ran."""
        # The assembled messages, not the request's: in a stored conversation the
        # question was asked in an earlier request.
        msgs = turn.step.messages
        if len(msgs) < 2 or msgs[-1]["role"] != "user" or msgs[-2]["role"] != "assistant":
            return None, False
        ref = _ACTION_REF.findall(msgs[-2]["content"] or "")
        if not ref:
            return None, False
        try:
            row = await asyncio.to_thread(self.executor.get_action, ref[-1], turn.req.principal)
        except NotFoundError:
            return None, False
        if AFFIRMATIVE.match(msgs[-1]["content"] or ""):
            ends = await self._approve(turn, row)
            return ends, ends is None
        if row["status"] == "pending":
            row = await asyncio.to_thread(self.executor.cancel, row["id"], turn.req.principal)
            turn.report.pending_action = public_action(row)
            return _said(f"Cancelled; nothing was done: {row['summary']}."), False
        return None, False

    async def _approve(self, turn: Turn, row: dict[str, Any]) -> list[TurnEvent] | None:
        p = turn.req.principal
        try:
            plan = turn.req.plan
            headers = plan.mcp_headers if plan is not None else {}  # the approving request's, as OpenAI's clients resend them
            row = await self.executor.approve(row["id"], p, request_id=turn.request_id, messages=turn.step.messages, mcp_headers=headers)
        except ConflictError:
            row = await asyncio.to_thread(self.executor.get_action, row["id"], p)
            turn.report.pending_action = public_action(row)
            return _said(f"That action was {row['status']} earlier, so nothing was done: {row['summary']}.")
        turn.report.pending_action = public_action(row)
        call = {"id": "call_" + row["id"].removeprefix("act_"), "function": {"name": row["tool"], "arguments": row["arguments"]}}
        result = row["result"] or ""
        if self.guard is not None and row["status"] == "succeeded":
            # The confirmed tool's result is data like any other tool's.
            result, events = await self.guard.tool_result(result)
            turn.guards.add(events)
        turn.step.messages = turn.step.messages + [{"role": "assistant", "content": call_text([call])}, {"role": "tool", "content": result}]
        return None
