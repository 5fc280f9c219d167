"""Tool calling units: the constraint, the call parser, the executor and the loop over
the ScriptedEngine (orchestration only; the real engine is in tests/e2e/test_tools.py)."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from typing import Annotated

import pytest
import regex
from fastapi.testclient import TestClient
from pydantic import Field

from server.app import create_app
from server.auth import Principal
from server.config import load_settings
from server.db import connect, sqlite_url
from server.engine.scripted import ScriptedEngine
from server.errors import ConflictError, InvalidRequestError
from server.toolcalls.constraint import (
    build_constraint,
    integer_regex,
    number_regex,
    response_format_regex,
    tool_call_regex,
)
from server.toolcalls.executor import Executor
from server.toolcalls.format import CallParser
from server.toolcalls.registry import Registry, ToolContext, ToolError, tool
from server.toolcalls.tenancy import tenant_database
from tools import support

ALICE = Principal("acme", "cust_1001", ("*",), key_id="k1")


# ---------------------------------------------------------------- constraint


@pytest.mark.parametrize("lo,hi", [(None, None), (-120, 7), (1, 7), (0, 1234), (15, None), (None, -3), (-5, 5), (99, 100)])
def test_integer_regex_matches_exactly_the_range(lo, hi):
    pattern = regex.compile(integer_regex(lo, hi))
    for v in range(-1500, 1500):
        assert bool(pattern.fullmatch(str(v))) == ((lo is None or v >= lo) and (hi is None or v <= hi)), v
    assert not pattern.fullmatch("01") and not pattern.fullmatch("-0")


@pytest.mark.parametrize("lo,hi", [(0, 1), (10, 30), (-5.5, 3.7), (0.000001, 1e6), (None, 0)])
def test_number_regex_only_matches_values_in_range(lo, hi):
    pattern = regex.compile(number_regex(lo, hi))
    hits = [s for s in (f"{x / 8:g}" for x in range(-400, 400)) if pattern.fullmatch(s)]
    assert hits and all((lo is None or float(s) >= lo) and (hi is None or float(s) <= hi) for s in hits)


def test_constraint_accepts_valid_calls_and_rejects_invalid():
    params = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}, "unit": {"enum": ["c", "f"]}}, "required": ["days"]}
    one = regex.compile(build_constraint([("weather", params)], allow_text=False, parallel=False).regex)
    assert one.fullmatch('[{"name": "weather", "arguments": {"days": 3, "unit": "c"}}]')
    assert not one.fullmatch('[{"name": "weather", "arguments": {"days": 9}}]')
    assert not one.fullmatch('[{"name": "weather", "arguments": {"unit": "c"}}]')
    assert not one.fullmatch('[{"name": "weather", "arguments": {"days": 3}}, {"name": "weather", "arguments": {"days": 4}}]')
    many = regex.compile(build_constraint([("weather", params)], allow_text=True, parallel=True).regex)
    assert many.fullmatch('[{"name": "weather", "arguments": {"days": 3}}, {"name": "weather", "arguments": {"days": 4}}]')
    assert many.fullmatch("It is sunny.") and not many.fullmatch("[not a call]")


def test_uncompilable_schema_names_the_tool():
    with pytest.raises(InvalidRequestError) as err:
        tool_call_regex("weird", {"type": "object", "properties": {"x": {"type": "string", "format": "ipv4"}}})
    assert "`weird`" in err.value.message and err.value.code == "invalid_tool_schema"


def test_call_parser_joins_fragments_whatever_the_chunking():
    text = '[{"name": "a_b", "arguments": {"q": "x\\"}]{", "n": [1, {"k": "]"}]}}, {"name": "c", "arguments": {}}]'
    rng = random.Random(7)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 12)))
        parser, names, args = CallParser(), [], {}
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            delta = parser.feed(text[a:b])
            names += [c.name for c in delta.started]
            for k, piece in delta.fragments:
                args[k] = args.get(k, "") + piece
        assert names == ["a_b", "c"] and json.loads(args[0]) == {"q": 'x"}]{', "n": [1, {"k": "]"}]} and args[1] == "{}"


# ---------------------------------------------------------------- executor


@tool(retries=2)
def flaky(ctx: ToolContext, n: int) -> dict:
    """Fails on the first attempt, then answers."""
    flaky.fn.calls = getattr(flaky.fn, "calls", 0) + 1
    if flaky.fn.calls == 1:
        raise ConnectionError("blip")
    return {"n": n}


@tool(timeout=0.2)
def slow(ctx: ToolContext) -> str:
    """Takes too long."""
    time.sleep(1)
    return "late"


@tool(rate_limit="2/minute")
def limited(ctx: ToolContext, email: str) -> str:
    """Rate-limited, takes personal data."""
    return "ok"


@tool
def refuses(ctx: ToolContext) -> str:
    """Always refuses."""
    raise ToolError("not allowed for this customer")


counter = {"runs": 0}


@tool(destructive=True, confirm="delete {what}")
def delete_thing(ctx: ToolContext, what: Annotated[str, Field(pattern="^[a-z]+$")]) -> dict:
    """Deletes a thing."""
    time.sleep(0.05)
    counter["runs"] += 1
    return {"deleted": what}


@pytest.fixture
def executor(db_url):
    """On SQLite and on PostgreSQL: confirmations and rate limits rest on the database."""
    flaky.fn.calls = 0  # the test tools' own state starts afresh for each run
    counter["runs"] = 0
    registry = Registry()
    registry.add_pack("test", [flaky, slow, limited, refuses, delete_thing])
    return Executor(registry, connect(db_url), action_ttl_s=60)


def _run(executor, name, args, principal=ALICE):
    ctx = ToolContext(principal.tenant, principal.user, principal.key_id, "req")
    return asyncio.run(executor.run([("call_1", name, json.dumps(args))], principal, ctx))[0]


def test_executor_turns_failures_into_results(executor):
    assert _run(executor, "flaky", {"n": 2}).content == '{"n": 2}'  # retried once (idempotent)
    assert _run(executor, "slow", {}).status == "timeout"
    refused = _run(executor, "refuses", {})
    assert refused.status == "error" and "not allowed" in refused.content
    bad = _run(executor, "flaky", {"n": "many"})
    assert bad.status == "invalid" and "n:" in json.loads(bad.content)["error"]
    assert _run(executor, "nope", {}).status == "invalid"
    assert _run(executor, "refuses", {}, Principal("acme", "u", ("chat",))).status == "denied"
    rows = executor.audit_rows(tool="flaky")
    assert [r["status"] for r in rows] == ["ok", "invalid"] and rows[0]["attempts"] == 2


def test_rate_limit_per_key_and_redacted_audit(executor):
    statuses = [_run(executor, "limited", {"email": "alice@example.com"}).status for _ in range(3)]
    assert statuses == ["ok", "ok", "rate_limited"]
    assert _run(executor, "limited", {"email": "x@y.org"}, Principal("acme", "bob", ("*",), key_id="k2")).status == "ok"
    assert all("alice@example.com" not in r["arguments"] for r in executor.audit_rows(tool="limited"))


def test_destructive_tool_waits_and_runs_once_under_concurrent_approvals(executor):
    pending = _run(executor, "delete_thing", {"what": "report"})
    assert pending.status == "pending_confirmation" and counter["runs"] == 0
    action_id = pending.action["id"]

    async def approve_all():
        return await asyncio.gather(*(executor.approve(action_id, ALICE, operator=True) for _ in range(20)))

    before = counter["runs"]
    rows = asyncio.run(approve_all())
    assert counter["runs"] == before + 1 and {r["status"] for r in rows} == {"succeeded"}
    with pytest.raises(ConflictError):
        executor.cancel(action_id, ALICE)


def test_cancelled_or_expired_action_cannot_run(executor):
    first = _run(executor, "delete_thing", {"what": "a"}).action["id"]
    executor.cancel(first, ALICE)
    with pytest.raises(ConflictError):
        asyncio.run(executor.approve(first, ALICE))
    executor.action_ttl_s = 0.01
    second = _run(executor, "delete_thing", {"what": "b"}).action["id"]
    time.sleep(0.05)
    with pytest.raises(ConflictError) as err:
        asyncio.run(executor.approve(second, ALICE))
    assert err.value.code == "action_expired"


def test_other_users_cannot_see_an_action(executor):
    action_id = _run(executor, "delete_thing", {"what": "c"}).action["id"]
    with pytest.raises(Exception) as err:
        executor.get_action(action_id, Principal("acme", "mallory", ("*",)))
    assert getattr(err.value, "status_code", None) == 404


# ---------------------------------------------------------------- support pack


def test_support_pack_scopes_records_to_the_customer(tmp_path):
    registry = Registry.load(["support"], data_root=tmp_path)
    support.configure(refund_limit=50)
    lookup, refund, handoff = (registry.get(name) for name in ("lookup_ticket", "create_refund", "handoff_to_agent"))
    alice = ToolContext("acme", "cust_1001", None, "r", idempotency_key="act_1")
    assert lookup.call(alice, {"ticket_id": "T-1001"})["order_id"] == "ORD-5002"
    with pytest.raises(ToolError):
        lookup.call(alice, {"ticket_id": "T-1003"})  # Bob's
    with pytest.raises(ToolError, match="above 50.00"):
        refund.call(alice, {"order_id": "ORD-5002", "amount": 60.0, "reason": "damaged"})
    first = refund.call(alice, {"order_id": "ORD-5002", "amount": 20.0, "reason": "damaged"})
    again = refund.call(alice, {"order_id": "ORD-5002", "amount": 20.0, "reason": "damaged"})
    assert first == again  # same idempotency key: one refund
    acme_db = tenant_database(tmp_path, "support", "acme")
    with sqlite3.connect(acme_db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM refunds").fetchone()[0] == 1
    done = handoff.call(ToolContext("acme", "cust_1001", None, "r", [{"role": "user", "content": "my dock is broken"}]), {"reason": "angry"})
    with sqlite3.connect(acme_db) as conn:
        assert "my dock is broken" in conn.execute("SELECT summary FROM handoffs WHERE id = ?", (done["handoff_id"],)).fetchone()[0]
    with registry.data["support"].connect("acme") as conn:
        support.reset_tenant_data(conn, "acme")
    with sqlite3.connect(acme_db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM refunds").fetchone()[0] == 0


# ---------------------------------------------------------------- the loop (ScriptedEngine)


@pytest.fixture
def scripted(tmp_path):
    engine = ScriptedEngine(served_model="scripted", max_model_len=4096)
    with TestClient(create_app(load_settings(data_dir=tmp_path, deployment="support"), engine=engine)) as api:
        yield engine, api


def test_server_loop_runs_tool_then_answers(scripted):
    engine, api = scripted
    engine.queue('[{"name": "check_subscription_status", "arguments": {}}]', "You are on the Pro plan.")
    body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "plan?"}], "tools": [{"type": "server", "name": "support"}]}).json()
    assert body["choices"][0]["message"]["content"] == "You are on the Pro plan."
    assert body["server_tool_calls"][0]["name"] == "check_subscription_status"
    assert len(engine.calls) == 2 and engine.calls[1].params.regex is not None


def test_repeated_call_in_one_step_is_dropped(scripted):
    engine, api = scripted
    call = '{"name": "f", "arguments": {"x": 1}}'
    engine.queue(f"[{call}, {call}, {call}]")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
    body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "go"}], "tools": tools, "tool_choice": "required"}).json()
    assert len(body["choices"][0]["message"]["tool_calls"]) == 1 and body["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_without_tools_is_rejected(scripted):
    _, api = scripted
    r = api.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "go"}], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


# ------------------------------------------------------------------ bounded compiles


@pytest.mark.parametrize(
    ("pattern", "why"),
    [("(a+)+b", "nests one quantifier"), ("[0-9]{100}", "more than 64 times"), ("x" * 600, "longer than 512"), ("(unclosed", "not a valid regular expression")],
)
def test_patterns_whose_automata_could_explode_are_refused_the_same_way_everywhere(pattern, why):
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": pattern}}}
    with pytest.raises(InvalidRequestError) as err:
        tool_call_regex("lookup", schema)
    assert why in err.value.message and err.value.code == "invalid_tool_schema"
    with pytest.raises(InvalidRequestError) as err:
        response_format_regex(schema)
    assert why in err.value.message and err.value.param == "response_format"


def test_ordinary_patterns_and_bounds_compile():
    regex_text = tool_call_regex("lookup", {"type": "object", "properties": {"id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}, "n": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["id", "n"]})
    assert regex.fullmatch(regex_text, '{"name":"lookup","arguments":{"id":"ORD-1234","n":3}}')
    assert not regex.fullmatch(regex_text, '{"name":"lookup","arguments":{"id":"ORD-1234","n":9}}')
    # A response format is enforced as the same compact language, bounds included.
    shaped = response_format_regex({"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["score"]})
    assert regex.fullmatch(shaped, '{"score":4}') and not regex.fullmatch(shaped, '{"score":7}') and not regex.fullmatch(shaped, '{\n"score":4}')


def test_an_oversized_tool_set_is_a_400_not_a_slow_compile():
    tools = [(f"tool_{i}", {"type": "object", "properties": {f"field_{j}": {"type": "string", "enum": [f"value_{k}" for k in range(40)]} for j in range(20)}}) for i in range(40)]
    with pytest.raises(InvalidRequestError, match="over the limit"):
        build_constraint(tools, allow_text=True, parallel=True)


def test_the_enabled_packs_are_precompiled_with_the_regex_a_request_uses(tmp_path):
    from server.toolcalls.precompile import pack_constraints, precompile
    from server.toolcalls.spec import plan_tools

    registry = Registry.load(["support"], load_settings(data_dir=tmp_path))
    engine = ScriptedEngine(["x"], served_model="scripted", max_model_len=512)
    took = asyncio.run(precompile(engine, registry))
    assert set(took) == {"support"} and len(engine.calls) == 1
    call = engine.calls[0]
    assert call.params.max_tokens == 1 and call.params.regex == pack_constraints(registry)["support"]
    # The same regex as a request naming the pack builds, so the engine's cache hits.
    plan = plan_tools([{"type": "server", "name": "support"}], None, None, registry, Principal("default", "u", ("*", "tools:support")))
    assert build_constraint([(t.name, t.parameters) for t in plan.tools], allow_text=True, parallel=plan.parallel).regex == call.params.regex
