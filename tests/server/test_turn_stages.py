"""The turn pipeline's stages, each on its own (server/turn/). The whole turn, through the
app, is pinned by test_turn_snapshots.py; these test what each stage owns."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest
from sqlalchemy import insert, select

from server.auth import ANONYMOUS
from server.db import (
    batch_lines,
    batches,
    connect,
    conversations,
    guard_events,
    pending_actions,
    response_cache,
    tool_audit,
    trace_spans,
    turns,
    usage_records,
    workflow_runs,
)
from server.engine.base import EngineWrapper, GenerationChunk, GenerationParams
from server.engine.scripted import ScriptedEngine
from server.forgetting import forget_user
from server.guard import GuardEvent, Stage, Status, Verdict
from server.ids import PREFIXES, new_id
from server.memory.context import ContextRequest
from server.protocol import ChatCompletionRequest
from server.telemetry.cost import Accounting, Charge
from server.telemetry.metrics import Metrics
from server.turn.events import Choices, Kind, TurnEvent
from server.turn.generation import _StepParsers
from server.turn.guard_ledger import GuardLedger
from server.turn.input_gate import InputGate
from server.turn.ledger import TurnLedger
from server.turn.output_guard import OutputGuard
from server.turn.state import Progress, Turn, TurnRequest
from server.turn.tool_loop import Confirmation


def _turn(n: int = 1, **request) -> Turn:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": n, **request})
    turn = Turn(TurnRequest("chatcmpl-1", body, ANONYMOUS, None, time.perf_counter()), GuardLedger())
    turn.step.params = GenerationParams(max_tokens=8, n=n)
    return turn


# ------------------------------------------------------------------ events and accumulators


def test_choices_fold_text_calls_and_finish_per_choice():
    acc = Choices(2)
    for ev in [
        TurnEvent(Kind.TEXT, 0, "Hel"),
        TurnEvent(Kind.TEXT, 1, "other"),
        TurnEvent(Kind.TEXT, 0, "lo"),
        TurnEvent(Kind.CALL, 0, call=0, call_id="call_1", name="f"),
        TurnEvent(Kind.ARGS, 0, '{"a":', call=0),
        TurnEvent(Kind.ARGS, 0, " 1}", call=0),
        TurnEvent.finish(0, "tool_calls"),
        TurnEvent.finish(1, "stop"),
    ]:
        acc.add(ev)
    assert acc[0].text == "Hello" and acc[0].calls == [{"id": "call_1", "name": "f", "arguments": '{"a": 1}'}]
    assert (acc[0].finish_reason, acc[1].text, acc[1].finish_reason) == ("tool_calls", "other", "stop")
    # The stored answer replays the calls the way the chat template reads them.
    assert acc[0].message() == {"role": "assistant", "content": 'Hello\n[{"name": "f", "arguments": {"a": 1}}]'}


# ------------------------------------------------------------------ generation: one step's parsers


def _chunks(parsers: _StepParsers, texts: list[str]) -> list[TurnEvent]:
    out = []
    for k, text in enumerate(texts):
        last = k == len(texts) - 1
        out += parsers.feed(GenerationChunk(0, text, [k], finish_reason="stop" if last else None))
        if parsers.all_done():
            break
    return out


def test_a_client_call_streams_as_it_is_generated_and_ends_in_tool_calls():
    events = _chunks(_StepParsers(1, constrained=True, server=set()), ['[{"name": "f", ', '"arguments": {"x": 1}}', "]"])
    kinds = [e.kind for e in events]
    assert kinds[0] is Kind.CALL and events[0].name == "f" and Kind.ARGS in kinds
    assert events[-1].kind is Kind.FINISH and events[-1].text == "tool_calls"


def test_text_events_carry_the_engines_tokens_of_their_text():
    # A character split across tokens comes as a chunk with tokens and no text yet.
    events = _chunks(_StepParsers(1, constrained=False, server=set()), ["Hi", "", " \U0001f44b", "."])
    assert [(e.text, e.token_ids) for e in events if e.kind is Kind.TEXT] == [("Hi", (0,)), (" \U0001f44b", (1, 2)), (".", (3,))]


def test_an_exact_repeat_of_a_call_stops_the_choice():
    call = '{"name": "f", "arguments": {"x": 1}}'
    parsers = _StepParsers(1, constrained=True, server=set())
    events = _chunks(parsers, ["[", call, ", ", call, ", ", call, "]"])
    assert parsers.all_done() and sum(e.kind is Kind.CALL for e in events) == 1
    assert events[-1].text == "tool_calls"


def test_server_calls_are_held_back_and_prose_passes_unconstrained():
    held = _StepParsers(1, constrained=True, server={"f"})
    events = _chunks(held, ['[{"name": "f", "arguments": {}}]'])
    assert [e.kind for e in events] == [Kind.FINISH] and held.parsers[0].finished_calls()[0].name == "f"
    prose = _chunks(_StepParsers(1, constrained=False, server=set()), ["Hello", " there"])
    assert [(e.kind, e.text) for e in prose] == [(Kind.TEXT, "Hello"), (Kind.TEXT, " there"), (Kind.FINISH, "stop")]


# ------------------------------------------------------------------ input gate


def test_the_input_gate_checks_the_new_user_message_and_new_tool_results_only():
    messages = [
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "[call]"},
        {"role": "tool", "content": "result"},
        {"role": "user", "content": "new question"},
    ]
    checks = InputGate.checks(_turn(), messages)
    assert checks == {2: (Stage.TOOL_RESULT, "result", None), 3: (Stage.INPUT, "new question", None)}


def test_applying_verdicts_masks_history_and_records_a_refusal():
    turn = _turn()
    messages = [{"role": "system", "content": "mail a@b.example"}, {"role": "user", "content": "mine is jo@x.example"}, {"role": "user", "content": "bad"}]
    refusal = Verdict("input", Status.BLOCKED, "I can't help with that.", "rail", "why", [GuardEvent("input", "rail", "blocked", "why")])
    out = InputGate.apply(turn, messages, {2: refusal})
    assert out[0]["content"] == "mail a@b.example"  # the operator's system prompt is theirs
    assert out[1]["content"] == "mine is [EMAIL]"
    assert turn.report.refusal is refusal and [e.action for e in turn.guards.all()] == ["blocked"]


# ------------------------------------------------------------------ tool loop: the confirmation pause


def test_a_confirmation_names_each_action_and_how_to_answer():
    text = Confirmation([{"id": "act_1", "summary": "close ticket T-1"}, {"id": "act_2", "summary": "refund 5 EUR"}]).text()
    assert "- close ticket T-1 (action act_1)\n- refund 5 EUR (action act_2)" in text and 'Reply "yes"' in text


# ------------------------------------------------------------------ output guard: a swappable window


class _Window:
    """A buffering strategy of its own: releases word by word, blocks on "idiot"."""

    def __init__(self, system_prompt: str):
        self.pending = ""
        self.released = ""
        self.verdict: Verdict | None = None
        self.events: list[GuardEvent] = []

    @property
    def blocked(self) -> bool:
        return self.verdict is not None

    def add(self, text: str, logprobs) -> None:
        self.pending += text

    def due(self) -> bool:
        return True

    async def release(self, final: bool = False):
        if "idiot" in self.pending:
            self.verdict = Verdict("output", Status.BLOCKED, "[withheld]")
            self.events = [GuardEvent("output", "test window", "blocked")]
            return "", None
        text, self.pending = self.pending, ""
        self.released += text
        return text, None


def test_the_output_guard_takes_any_window_and_ends_a_blocked_choice():
    class _Guard:
        def output_window(self, system_prompt: str):
            raise AssertionError("the factory given replaces the guard's own")

    async def events():
        for word in ["Fine.", " You", " idiot", " more"]:
            yield TurnEvent(Kind.TEXT, 0, word)
        yield TurnEvent.finish(0, "stop")

    async def run():
        turn = _turn()
        out = [e async for e in OutputGuard(_Guard(), window=_Window).events(turn, events())]  # type: ignore[arg-type]
        return turn, out

    turn, out = asyncio.run(run())
    assert [(e.kind, e.text) for e in out] == [(Kind.TEXT, "Fine."), (Kind.TEXT, " You"), (Kind.TEXT, "\n\n[withheld]"), (Kind.FINISH, "content_filter")]
    assert [e.rail for e in turn.guards.all()] == ["test window"]


def test_a_stateful_turns_leak_check_guards_its_instructions_not_its_sources():
    """The system message of a stateful turn also holds its sources and the user's own
    memories, which an answer quotes on purpose; only the instructions can leak."""
    seen: list[str] = []

    class _Guard:
        def output_window(self, system_prompt: str):
            seen.append(system_prompt)
            return _Window(system_prompt)

    async def events():
        yield TurnEvent(Kind.TEXT, 0, "Refunds take 5 days. [1]")
        yield TurnEvent.finish(0, "stop")

    async def run(turn):
        return [e async for e in OutputGuard(_Guard()).events(turn, events())]  # type: ignore[arg-type]

    stateless = _turn()
    stateless.step.messages = [{"role": "system", "content": "Be brief.\n\nSources: [1] Refunds take 5 days."}, {"role": "user", "content": "hi"}]
    stateful = _turn()
    stateful.step.messages = stateless.step.messages
    stateful.context = ContextRequest("Be brief.", [{"role": "user", "content": "hi"}])
    asyncio.run(run(stateless))
    asyncio.run(run(stateful))
    assert seen == ["Be brief.\n\nSources: [1] Refunds take 5 days.", "Be brief."]


# ------------------------------------------------------------------ guard ledger


def test_the_guard_ledger_reports_retrieval_events_after_the_turns_own():
    ledger = GuardLedger()
    retrieved: list[GuardEvent] = []
    ledger.retrieval(retrieved)  # the context's list, filled while it is assembled
    ledger.add([GuardEvent("input", "a", "masked")])
    retrieved.append(GuardEvent("retrieval", "b", "neutralised"))
    ledger.add([GuardEvent("output", "c", "blocked")])
    assert [e.rail for e in ledger.all()] == ["a", "c", "b"]


# ------------------------------------------------------------------ turn ledger


def test_the_turn_ledger_settles_once_even_when_the_turn_is_cancelled(tmp_path):
    db = connect(f"sqlite:///{tmp_path / 'e.db'}")
    accounting = Accounting(db, cost_per_hour=3600.0)
    turn = _turn()
    ledger = TurnLedger("m", Metrics(), accounting, None, Charge(engine_seconds=0.5), ANONYMOUS)
    turn.ledger = ledger
    progress = Progress(completion_tokens=3, prompt_tokens=2)

    async def cancelled_while_streaming():
        with anyio.CancelScope() as scope:
            async with ledger.settling(turn, progress) as outcome:
                scope.cancel()  # the client hung up: every later await is cancelled…
                await anyio.sleep(1)
                outcome[0] = "completed"
        await ledger.settle(turn, progress, "again")  # …and a second settle is a no-op

    asyncio.run(cancelled_while_streaming())
    with db.connect() as conn:
        rows = conn.execute(select(usage_records.c.request_id, usage_records.c.completion_tokens)).all()
    assert rows == [("chatcmpl-1", 3)] and ledger.cost_usd == pytest.approx(0.5)


# ------------------------------------------------------------------ engines


def test_a_wrapped_engine_declares_the_inner_engines_health():
    inner = ScriptedEngine(served_model="m")
    wrapped = EngineWrapper(inner)
    assert wrapped.available() and wrapped.state == "serving" and wrapped.scheduler_counts() is None
    inner.up = False
    assert not wrapped.available() and wrapped.served_model == "m"


# ------------------------------------------------------------------ ids and forgetting


def test_ids_keep_the_prefixes_clients_know():
    assert new_id("response").startswith("resp_") and new_id("file").startswith("file-") and len(new_id("action")) == len("act_") + 24
    assert set(PREFIXES) >= {"response", "message", "function_call", "conversation", "action", "vector_store", "file", "memory"}


def test_forgetting_a_user_asks_each_store_and_keeps_others(db_url):
    db = connect(db_url)
    now = time.time()
    with db.begin() as conn:
        for user in ("ann", "bob"):
            conn.execute(insert(conversations).values(id=f"conv_{user}", tenant="t", user=user, name=None, created_at=now, head=None))
            conn.execute(insert(turns).values(id=f"resp_{user}", conversation_id=f"conv_{user}", tenant="t", user=user, parent_id=None, depth=1, created_at=now, messages="[]"))
            conn.execute(insert(tool_audit).values(at=now, request_id="r", tenant="t", user=user, tool="x", arguments="{}", status="ok", attempts=1))
            conn.execute(insert(guard_events).values(at=now, request_id="r", tenant="t", user=user, stage="input", rail="r", action="masked", reason=""))
            conn.execute(insert(usage_records).values(request_id=f"r-{user}", at=now, tenant="t", user=user, model="m", prompt_tokens=1, completion_tokens=1, engine_seconds=0.1, cost_usd=0.0, duration_s=0.1))
            conn.execute(
                insert(workflow_runs).values(
                    id=f"wfr_{user}", tenant="t", user=user, conversation_id=f"conv_{user}", workflow="refund", node="confirm",
                    status="waiting", state="{}", version=1, created_at=now, updated_at=now,
                )
            )
            conn.execute(
                insert(batches).values(
                    id=f"batch_{user}", tenant="t", user=user, endpoint="/v1/chat/completions", input_file_id="file-x", completion_window="24h",
                    status="completed", total=1, completed=1, failed=0, input_tokens=1, output_tokens=1, created_at=now, expires_at=now + 60,
                )
            )
            conn.execute(insert(batch_lines).values(batch_id=f"batch_{user}", line=1, custom_id="a", body="{}", status_code=200, finished_at=now))
        # A personal cached answer of each user, and one shared by the tenant's users.
        for entry, user in (("rc_ann", "ann"), ("rc_bob", "bob"), ("rc_shared", None)):
            conn.execute(insert(response_cache).values(id=entry, tenant="t", user=user, model="m", exact_key="e", context_key="c", answer="a", finish_reason="stop", created_at=now, expires_at=now + 60))
    counts = forget_user(db, "t", "ann")
    assert counts == {"turns": 1, "conversations": 1, "tool_audit": 1, "pending_actions": 0, "guard_events": 1, "trace_spans": 0, "response_cache": 1, "workflow_runs": 1, "batches": 1, "batch_lines": 1}
    with db.connect() as conn:
        assert conn.execute(select(conversations.c.user)).scalars().all() == ["bob"]
        assert conn.execute(select(batch_lines.c.batch_id)).scalars().all() == ["batch_bob"]
        assert conn.execute(select(workflow_runs.c.user)).scalars().all() == ["bob"]
        assert sorted(conn.execute(select(response_cache.c.id)).scalars().all()) == ["rc_bob", "rc_shared"]
        assert sorted(conn.execute(select(usage_records.c.user)).scalars().all()) == ["[forgotten]", "bob"]
        assert conn.execute(select(pending_actions)).all() == [] and conn.execute(select(trace_spans)).all() == []
