"""Cost attribution, budgets, usage and tracing: the accounting rules on their own, then
the pipeline over the ScriptedEngine (orchestration only; the live server has its own
end-to-end tests in tests/e2e/test_observability.py)."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.auth import KeyStore
from server.config import load_settings
from server.db import connect
from server.engine.scripted import ScriptedEngine
from server.telemetry.cost import Budgets, Charge, EngineClock, UsageLedger, cost_usd
from server.telemetry.redaction import install_log_redaction


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_engine_time_is_shared_among_overlapping_generations():
    now = FakeClock()
    clock = EngineClock(now)
    a = clock.enter()  # t=0: A alone
    now.t = 2.0
    b = clock.enter()  # t=2: A and B share
    now.t = 6.0
    share_a = clock.leave(a)  # A: 2 s alone + 4 s / 2
    now.t = 7.0
    share_b = clock.leave(b)  # B: 4 s / 2 + 1 s alone
    now.t = 9.0  # idle time is nobody's
    c = clock.enter()
    now.t = 10.0
    share_c = clock.leave(c)
    assert (share_a, share_b, share_c) == (4.0, 3.0, 1.0)
    assert clock.busy_seconds == share_a + share_b + share_c == 8.0


def test_a_charge_past_its_ceiling_is_unbilled():
    charge = Charge(ceiling_seconds=1.0)
    charge.add(0.75)
    assert not charge.over(0.2) and charge.over(0.25)
    charge.add(0.5)
    assert (charge.engine_seconds, charge.unbilled_seconds) == (1.0, 0.25)
    assert cost_usd(3600, 0.10) == pytest.approx(0.10)


def test_budget_holds_are_atomic_under_concurrency(db_url):
    budgets = Budgets(connect(db_url))
    holds: list[str | None] = []
    start = threading.Barrier(50)

    def reserve() -> None:
        start.wait()
        holds.append(budgets.reserve("key_1", limit_usd=1.0, hold_usd=0.1))

    threads = [threading.Thread(target=reserve) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted = [h for h in holds if h is not None]
    assert len(admitted) == 10  # 10 holds of 0.1 fill a budget of 1.0, never an 11th
    assert budgets.status("key_1")["held_usd"] == pytest.approx(1.0)
    for hold in admitted:
        budgets.settle("key_1", hold, 0.04)
    state = budgets.status("key_1")
    assert state["held_usd"] == pytest.approx(0) and state["spent_usd"] == pytest.approx(0.4)
    assert sum(budgets.reserve("key_1", 1.0, 0.1) is not None for _ in range(10)) == 6  # 0.6 left


def test_a_hold_left_by_a_dead_process_expires(db_url):
    budgets = Budgets(connect(db_url))
    budgets.HOLD_TTL_S = -1.0  # every hold is already stale when the next request comes
    assert budgets.reserve("key_1", 1.0, 1.0) is not None  # never settled: its process "died"
    assert budgets.reserve("key_1", 1.0, 1.0) is not None  # the stale hold no longer counts


def test_usage_sums_by_group_and_tenant(db_url):
    ledger = UsageLedger(connect(db_url))
    rows = [("r1", "acme", "k1", "c1", 0.5), ("r2", "acme", "k1", "c1", 0.25), ("r3", "acme", "k2", None, 1.0), ("r4", "globex", "k3", None, 2.0)]
    for rid, tenant, key, conv, usd in rows:
        ledger.record(
            {"request_id": rid, "at": 1.0, "tenant": tenant, "user": "u", "key_id": key, "conversation_id": conv, "model": "m",
             "prompt_tokens": 10, "completion_tokens": 5, "engine_seconds": usd * 10, "cost_usd": usd, "duration_s": 1.0}
        )
    by_key = ledger.summary("key", "acme")
    assert {b["key_id"]: b["cost_usd"] for b in by_key["data"]} == {"k1": 0.75, "k2": 1.0}
    assert by_key["total"] == {"requests": 3, "prompt_tokens": 30, "completion_tokens": 15, "engine_seconds": 17.5, "cost_usd": 1.75}
    assert ledger.summary("tenant", None)["total"]["cost_usd"] == 3.75
    assert {b["conversation_id"]: b["requests"] for b in ledger.summary("conversation", "acme")["data"]} == {"c1": 2, None: 1}


def test_log_arguments_stay_positional_and_masked():
    """uvicorn's access log unpacks its arguments; the redaction must keep them."""
    install_log_redaction()
    record = logging.getLogRecordFactory()("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:1", "GET", "/v1/x?email=jo@example.com", "1.1", 200), None)
    _client, _method, path, _version, status = record.args
    assert path == "/v1/x?email=[EMAIL]" and status == 200
    assert "jo@example.com" not in record.getMessage()


def test_client_strings_in_a_log_record_cannot_start_a_line_of_their_own():
    install_log_redaction()
    make = logging.getLogRecordFactory()
    forged = "x\n2026-11-30 12:00:00,000 ERROR enclave: forged\r\x1b[2J\u202e"
    by_args = make("enclave", logging.INFO, __file__, 1, "ignored request fields: %s", (forged,), None)
    by_object = make("enclave", logging.INFO, __file__, 1, "failed: %s", (ValueError(forged),), None)
    formatted = make("enclave", logging.INFO, __file__, 1, f"said {forged}", None, None)
    try:
        raise ValueError(forged)
    except ValueError:
        import sys

        with_traceback = make("enclave", logging.ERROR, __file__, 1, "boom %s", (forged,), sys.exc_info())
    for record in (by_args, by_object, formatted):
        message = record.getMessage()
        assert "\n" not in message and "\r" not in message and "\x1b" not in message and "\u202e" not in message, message
        assert "x\\n" in message  # shown, escaped
    lines = with_traceback.getMessage().splitlines()
    assert "\n" not in lines[0] and all(line.startswith("    ") for line in lines[1:])


# ---------------------------------------------------------------- the pipeline


@pytest.fixture
def served(tmp_path, db_url):
    keys = KeyStore(tmp_path / "keys.json")
    plain, _ = keys.create("acme", "ann", ["chat", "traces", "usage"])
    other, _ = keys.create("globex", "gus", ["chat", "traces", "usage"])
    budgeted, record = keys.create("acme", "bob", ["chat", "usage"], budget_usd=5.0)
    # $1 per engine second makes the arithmetic readable.
    settings = load_settings(data_dir=tmp_path, rails=False, cost_per_hour=3600.0, database_url=db_url)
    engine = ScriptedEngine(served_model="scripted", max_model_len=400, token_delay=0.01)
    with TestClient(create_app(settings, engine=engine, embedder=None)) as client:
        yield client, engine, {"plain": plain, "other": other, "budgeted": budgeted}, record["id"]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_turn_returns_its_trace_id_and_the_trace_holds_its_model_call(served):
    client, engine, keys, _ = served
    engine.queue("one two three four")
    r = client.post("/v1/chat/completions", headers=_auth(keys["plain"]), json={"model": "scripted", "messages": [{"role": "user", "content": "hi jo@example.com"}]})
    assert r.status_code == 200
    body, trace_id = r.json(), r.headers["x-trace-id"]
    t = client.get(f"/v1/traces/{trace_id}", headers=_auth(keys["plain"])).json()
    assert t["id"] == trace_id and t["name"] == "invoke_agent enclave"
    (call,) = [s for s in t["spans"] if s["name"] == "chat scripted"]
    assert call["attributes"]["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"] == 4
    assert call["attributes"]["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert body["cost"]["usd"] == pytest.approx(body["cost"]["engine_seconds"], rel=1e-4)  # $1/s
    assert "jo@example.com" not in json.dumps(t)
    # Another tenant cannot see it; a malformed id is a 404 too.
    assert client.get(f"/v1/traces/{trace_id}", headers=_auth(keys["other"])).status_code == 404
    assert client.get("/v1/traces/not-a-trace", headers=_auth(keys["plain"])).json()["error"]["code"] == "not_found"


def test_a_failed_turn_is_traced_as_an_error(served):
    client, _, keys, _ = served
    r = client.post("/v1/chat/completions", headers=_auth(keys["plain"]), json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    (root,) = client.get(f"/v1/traces/{r.headers['x-trace-id']}", headers=_auth(keys["plain"])).json()["spans"]
    assert root["status"] == "error" and root["attributes"]["error.type"] == "ModelNotFoundError"


def test_a_budget_refuses_what_it_cannot_cover_and_caps_what_it_admits(served):
    client, engine, keys, key_id = served
    accounting = client.app.state.runtime.accounting
    # Holds of 2 x 0.25 s x 4 tokens = $2: two fit in $5, a third does not.
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert accounting.hold(4) == pytest.approx((2.0, 2.0))
    held = [accounting.budgets.reserve(key_id, 5.0, 2.0), accounting.budgets.reserve(key_id, 5.0, 2.0)]
    assert None not in held
    r = client.post("/v1/chat/completions", headers=_auth(keys["budgeted"]), json=body)
    assert r.status_code == 429 and r.json()["error"]["type"] == "insufficient_quota" and "budget" in r.json()["error"]["message"]
    assert client.get(f"/v1/traces/{r.headers['x-trace-id']}", headers=_auth(keys["plain"])).json()["spans"][0]["attributes"]["error.type"] == "InsufficientQuotaError"
    for hold in held:
        accounting.budgets.settle(key_id, hold, 0.0)

    # A pace far below the engine's: the hold is tiny and the generation is cut at it.
    accounting.seconds_per_token = 0.0001
    engine.queue(" ".join(["word"] * 200))
    r = client.post("/v1/chat/completions", headers=_auth(keys["budgeted"]), json={**body, "max_tokens": 200})
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] < 200
    assert out["cost"]["capped_by_budget"] and out["cost"]["usd"] <= 2 * 0.0001 * 200 + 1e-12
    usage = client.get("/v1/usage", headers=_auth(keys["budgeted"])).json()
    assert usage["budget"]["held_usd"] == pytest.approx(0) and usage["budget"]["spent_usd"] == pytest.approx(out["cost"]["usd"])


def test_usage_rejects_an_unknown_grouping(served):
    client, _, keys, _ = served
    r = client.get("/v1/usage", params={"group_by": "planet"}, headers=_auth(keys["plain"]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "group_by"


def test_a_streamed_turn_is_traced_and_its_usage_chunk_carries_the_cost(served):
    client, engine, keys, _ = served
    engine.queue("alpha beta gamma")
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", headers=_auth(keys["plain"]), json=body) as r:
        trace_id = r.headers["x-trace-id"]
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = chunks[-1]
    assert last["usage"]["completion_tokens"] == 3 and last["cost"]["usd"] > 0
    spans = client.get(f"/v1/traces/{trace_id}", headers=_auth(keys["plain"])).json()["spans"]
    root = next(s for s in spans if s["parent_id"] is None)
    assert root["attributes"]["enclave.outcome"] == "completed" and root["attributes"]["gen_ai.usage.output_tokens"] == 3
    assert [s["attributes"]["gen_ai.usage.output_tokens"] for s in spans if s["name"] == "chat scripted"] == [3]
    usage = client.get("/v1/usage", params={"group_by": "request"}, headers=_auth(keys["plain"])).json()
    assert usage["total"]["cost_usd"] == pytest.approx(last["cost"]["usd"])


def test_traces_show_names_a_missing_trace(tmp_path):
    from server.cli import main

    assert main(["traces", "show", "0" * 32, "--data-dir", str(tmp_path)]) == 2


def test_traces_are_exported_over_otlp_when_an_endpoint_is_set(tmp_path):
    """A real OTLP/HTTP receiver on loopback gets the same spans the SQL store keeps."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
            body = self.rfile.read(int(self.headers["content-length"]))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            received.append(request)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    collector = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_port}/v1/traces"
        settings = load_settings(data_dir=tmp_path, rails=False, otlp_endpoint=endpoint)
        with TestClient(create_app(settings, engine=ScriptedEngine(["fine thanks"], served_model="scripted"), embedder=None)) as client:
            r = client.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hello"}]})
            trace_id = r.headers["x-trace-id"]
            client.app.state.runtime.tracing.flush()
            stored = {s["name"] for s in client.app.state.runtime.tracing.store.get(trace_id)}
    finally:
        collector.shutdown()
    exported = [s for req in received for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans if s.trace_id.hex() == trace_id]
    assert {s.name for s in exported} == stored == {"invoke_agent enclave", "chat scripted"}
    resource = {a.key: a.value.string_value for req in received for rs in req.resource_spans for a in rs.resource.attributes}
    assert resource["service.name"] == "enclave"


def test_a_response_is_traced_like_a_chat_completion(served):
    client, engine, keys, _ = served
    engine.queue("hello there")
    r = client.post("/v1/responses", headers=_auth(keys["plain"]), json={"model": "scripted", "input": "hi", "store": False})
    assert r.status_code == 200
    spans = client.get(f"/v1/traces/{r.headers['x-trace-id']}", headers=_auth(keys["plain"])).json()["spans"]
    root = next(s for s in spans if s["parent_id"] is None)
    assert root["attributes"]["enclave.api"] == "responses" and root["attributes"]["gen_ai.response.id"] == r.json()["id"]
    assert root["attributes"]["gen_ai.usage.output_tokens"] == r.json()["usage"]["output_tokens"] == 2


def test_the_trace_store_drops_spans_past_their_retention(served):
    client, engine, keys, _ = served
    engine.queue("old answer")
    r = client.post("/v1/chat/completions", headers=_auth(keys["plain"]), json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
    tracing = client.app.state.runtime.tracing
    tracing.flush()
    store = tracing.store
    assert store.retention_s == 30 * 86400 and store.get(r.headers["x-trace-id"])
    assert store.prune(now=time.time() + 29 * 86400) == 0
    assert store.prune(now=time.time() + 31 * 86400) == 2  # the root and its model call
    assert store.get(r.headers["x-trace-id"]) == []
