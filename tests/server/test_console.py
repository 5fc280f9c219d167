"""The operator console (server/console) through the real app on a scripted engine:
signing in (the cookie's flags), every page and action sending a visitor without a
session to the sign-in page, CSRF and origin checks on every form, scopes (a key
without `actions` sees no approve button and gets 403 if it posts anyway), approving
a pending refund exactly once, the turns list with the rails that acted and a trace's
timeline, usage charts, eval reports (and no path out of their folder), a user's
memory for `memory:admin`, and batches. The browser tests (tests/e2e/test_console.py)
drive the same pages in headless Chromium against the live server."""

from __future__ import annotations

import json
import re
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient

from evals.report import summarise, write_report
from server.app import create_app
from server.auth import KeyStore
from server.config import load_settings
from server.console.session import COOKIE, CSRF_FIELD
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.toolcalls.tenancy import tenant_database

PAGES = ["/console", "/console/actions", "/console/turns", "/console/guardrails", "/console/usage", "/console/evals", "/console/memory", "/console/batches"]
POSTS = ["/console/actions/act_x/approve", "/console/actions/act_x/cancel", "/console/memory/mem_x/delete", "/console/memory/forget", "/console/logout"]


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


@pytest.fixture
def console(tmp_path, embedder):
    keys = KeyStore(tmp_path / "keys.json")
    made = {
        "operator": keys.create("acme", "ops", ["*", "actions", "traces", "usage:admin", "memory:admin"])[0],
        "customer": keys.create("acme", "cust_1001", ["chat", "tools:support", "memory", "usage", "knowledge"])[0],
        "globex": keys.create("globex", "gina", ["*", "actions", "traces"])[0],
    }
    reports = tmp_path / "reports"
    settings = load_settings(data_dir=tmp_path, rails=False, deployment="support", eval_reports_dir=reports, cost_per_hour=3.6)
    engine = ScriptedEngine(served_model="scripted", max_model_len=1024)
    with TestClient(create_app(settings, engine=engine, embedder=embedder), follow_redirects=False) as client:
        yield client, made, reports


def _sign_in(client: TestClient, key: str) -> str:
    client.cookies.clear()
    r = client.post("/console/login", data={"api_key": key, "next": "/console"})
    assert r.status_code == 303 and r.headers["location"] == "/console"
    page = client.get("/console")
    assert page.status_code == 200
    return _csrf(page.text)


def _csrf(html: str) -> str:
    return re.search(rf'name="{CSRF_FIELD}" value="([0-9a-f]+)"', html).group(1)


def _refund_pending(client: TestClient, key: str) -> str:
    """The refund workflow creates a pending create_refund at its confirm node."""
    body = {"model": "workflow:refund", "messages": [{"role": "user", "content": "Please refund order ORD-5002, it arrived damaged."}], "conversation": "c1"}
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["pending_action"]["id"]


def test_without_a_session_every_page_and_action_leads_to_the_sign_in_page(console):
    client, _, _ = console
    for path in PAGES + ["/console/traces/" + "0" * 32, "/console/evals/run1"]:
        r = client.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next="), path
    for path in POSTS:
        r = client.post(path, data={CSRF_FIELD: "x", "user": "u"})
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login"), path
    page = client.get("/console/login?next=/console/turns")
    assert page.status_code == 200 and 'type="password"' in page.text and 'name="next" value="/console/turns"' in page.text
    assert "<script" not in page.text and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    # A stale or forged cookie is no session either.
    client.cookies.set(COOKIE, "sk-enclave-forged", path="/console")
    assert client.get("/console").status_code == 303


def test_signing_in_sets_a_strict_http_only_cookie_and_refuses_bad_keys(console):
    client, keys, _ = console
    bad = client.post("/console/login", data={"api_key": "sk-enclave-nope", "next": "/console"})
    assert bad.status_code == 401 and "not valid" in bad.text and COOKIE not in bad.headers.get("set-cookie", "")
    r = client.post("/console/login", data={"api_key": keys["customer"], "next": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/console"  # never off this server
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    # The cookie is the console's only: the API still wants its bearer key.
    assert client.get("/v1/models").status_code == 401
    # Signing out ends the session.
    token = _csrf(client.get("/console").text)
    out = client.post("/console/logout", data={CSRF_FIELD: token})
    assert out.status_code == 303 and out.headers["location"] == "/console/login"
    client.cookies.clear()
    assert client.get("/console").status_code == 303


def test_forms_need_their_token_and_this_origin(console):
    client, keys, _ = console
    token = _sign_in(client, keys["operator"])
    action = _refund_pending(client, keys["customer"])
    for data, headers in (({}, {}), ({CSRF_FIELD: "0" * 64}, {}), ({CSRF_FIELD: token}, {"Origin": "https://evil.example"})):
        r = client.post(f"/console/actions/{action}/approve", data=data, headers=headers)
        assert r.status_code == 403 and "csrf_failed" in r.text
    assert client.get("/v1/actions/" + action, headers={"Authorization": f"Bearer {keys['operator']}"}).json()["status"] == "pending"


def test_a_key_without_actions_sees_no_approve_button_and_is_refused(console):
    client, keys, _ = console
    action = _refund_pending(client, keys["customer"])
    token = _sign_in(client, keys["customer"])
    page = client.get("/console/actions")
    assert page.status_code == 200 and "needs the <code>actions</code> scope" in page.text and "Approve" not in page.text
    home = client.get("/console").text
    assert 'href="/console/turns"' not in home and "Turns: needs the <code>traces</code> scope" in home
    r = client.post(f"/console/actions/{action}/approve", data={CSRF_FIELD: token})
    assert r.status_code == 403 and "lacks the &#39;actions&#39; scope" in r.text
    assert client.get("/console/turns").status_code == 403


def test_an_operator_approves_a_refund_once(console):
    client, keys, _ = console
    settings = client.app.state.settings
    action = _refund_pending(client, keys["customer"])
    token = _sign_in(client, keys["operator"])
    page = client.get("/console/actions").text
    assert action in page and f'aria-label="Approve create_refund {action}"' in page
    r = client.post(f"/console/actions/{action}/approve", data={CSRF_FIELD: token}, headers={"Origin": "http://testserver"})
    assert r.status_code == 303
    done = client.get(r.headers["location"])
    assert f"Action {action} approved: succeeded." in done.text
    # Approving again shows its outcome and runs nothing (the API's exactly-once).
    again = client.post(f"/console/actions/{action}/approve", data={CSRF_FIELD: token})
    assert again.status_code == 303 and "succeeded" in client.get(again.headers["location"]).text
    with sqlite3.connect(tenant_database(settings.resolved_pack_data_dir, "support", "acme")) as conn:
        assert conn.execute("SELECT count(*) FROM refunds WHERE order_id = 'ORD-5002'").fetchone()[0] == 1
    cancelled = client.post(f"/console/actions/{action}/cancel", data={CSRF_FIELD: token})
    assert cancelled.status_code == 409 and "already done" in cancelled.text
    # Another tenant's operator cannot see or decide it.
    other = _sign_in(client, keys["globex"])
    assert action not in client.get("/console/actions").text
    assert client.post(f"/console/actions/{action}/cancel", data={CSRF_FIELD: other}).status_code == 404


def test_turns_list_with_rails_and_a_trace_timeline(console):
    client, keys, _ = console
    r = client.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hello there"}]}, headers={"Authorization": f"Bearer {keys['customer']}"})
    request_id, trace_id = r.json()["id"], r.headers["x-trace-id"]
    client.app.state.runtime.guard_audit.write(request_id, "acme", "cust_1001", [_Event("input", "topic", "refused", "off topic")])
    _sign_in(client, keys["operator"])
    client.app.state.runtime.tracing.flush()
    page = client.get("/console/turns").text
    assert trace_id[:12] in page and "input: topic (refused)" in page and "cust_1001" in page
    assert trace_id[:12] in client.get("/console/turns", params={"rail": "topic"}).text
    assert trace_id[:12] not in client.get("/console/turns", params={"rail": "jailbreak"}).text
    assert trace_id[:12] in client.get("/console/turns", params={"q": "cust_1001"}).text
    trace = client.get(f"/console/traces/{trace_id}")
    assert trace.status_code == 200 and "<strong>topic</strong>" in trace.text and 'class="timeline"' in trace.text and "<rect" in trace.text
    guard = client.get("/console/guardrails").text
    assert "<svg" in guard and "<strong>topic</strong>" in guard
    assert client.get("/console/traces/" + "f" * 32).status_code == 404
    _sign_in(client, keys["globex"])  # another tenant's operator
    assert trace_id[:12] not in client.get("/console/turns").text
    assert client.get(f"/console/traces/{trace_id}").status_code == 404


class _Event:
    def __init__(self, stage: str, rail: str, action: str, reason: str):
        self.stage, self.rail, self.action, self.reason = stage, rail, action, reason


def test_usage_page_with_charts(console):
    client, keys, _ = console
    client.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {keys['customer']}"})
    _sign_in(client, keys["operator"])
    page = client.get("/console/usage").text
    assert "By tenant" in page and "By key" in page and "By model" in page and page.count('<svg class="chart"') == 3 and "acme" in page
    _sign_in(client, keys["customer"])
    page = client.get("/console/usage").text
    assert "By tenant" not in page and "By user" in page


def test_eval_reports_are_listed_and_shown_and_nothing_else_is_served(console):
    client, keys, reports = console
    results = [{"id": f"c{i}", "category": "must_refuse", "score": float(i % 2), "note": "", "latency_s": 0.5, "cost_usd": 1e-6} for i in range(4)]
    summary = summarise(results)
    meta = {"model": "smollm2", "base_url": "x", "started": time.time(), "duration_s": 1.0, "concurrency": 1, "cases": 4, "judge": False, "batches": []}
    write_report(reports / "run-1", meta, summary, results, None, None)
    (reports / "secret.txt").write_text("no")
    _sign_in(client, keys["operator"])
    listing = client.get("/console/evals").text
    assert 'href="/console/evals/run-1"' in listing and "no baseline" in listing
    page = client.get("/console/evals/run-1").text
    assert "must_refuse" in page and "0.500" in page and "/console/evals/run-1/charts/scores_by_category.png" in page
    png = client.get("/console/evals/run-1/charts/scores_by_category.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    for path in ("/console/evals/..%2Fsecret.txt", "/console/evals/run-1/charts/..%2F..%2Fsecret.txt", "/console/evals/run-1/charts/report.json", "/console/evals/nope"):
        assert client.get(path).status_code == 404, path


def test_memory_admin_lists_deletes_and_forgets(console):
    client, keys, _ = console
    memory = client.app.state.runtime.memory.episodic
    said = {"model": "scripted", "messages": [{"role": "user", "content": "My favourite colour is green and my email is carla@example.com."}], "conversation": "m1"}
    client.post("/v1/chat/completions", json=said, headers={"Authorization": f"Bearer {keys['customer']}"})
    deadline = time.monotonic() + 10
    while not (rows := memory.list("acme", "cust_1001")):
        assert time.monotonic() < deadline, "no memory was written"
        time.sleep(0.05)
    token = _sign_in(client, keys["operator"])
    page = client.get("/console/memory", params={"user": "cust_1001"})
    assert page.status_code == 200 and "memories of cust_1001" in page.text
    for row in rows:
        assert row["id"] in page.text
    assert "carla@example.com" not in page.text  # stored masked
    r = client.post(f"/console/memory/{rows[0]['id']}/delete", data={CSRF_FIELD: token, "user": "cust_1001"})
    assert r.status_code == 303 and memory.list("acme", "cust_1001") == rows[1:]
    wrong = client.post("/console/memory/forget", data={CSRF_FIELD: token, "user": "cust_1001", "confirm": "someone"})
    assert wrong.status_code == 400 and "type their user name again" in wrong.text
    done = client.post("/console/memory/forget", data={CSRF_FIELD: token, "user": "cust_1001", "confirm": "cust_1001"})
    assert done.status_code == 303 and "forgotten" in client.get(done.headers["location"]).text
    _sign_in(client, keys["customer"])
    assert client.get("/console/memory").status_code == 403


def test_batches_page(console):
    client, keys, _ = console
    auth = {"Authorization": f"Bearer {keys['customer']}"}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}}
    file_id = client.post("/v1/files", files={"file": ("b.jsonl", json.dumps(line).encode())}, data={"purpose": "batch"}, headers=auth).json()["id"]
    batch = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, headers=auth).json()
    _sign_in(client, keys["customer"])
    page = client.get("/console/batches").text
    assert batch["id"] in page and "/v1/chat/completions" in page


def test_every_page_renders_for_the_operator_without_scripts(console):
    client, keys, _ = console
    _sign_in(client, keys["operator"])
    for path in PAGES:
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:500])
        assert "<script" not in r.text and r.headers["cache-control"] == "no-store"
        assert '<main id="main"' in r.text and 'aria-current="page"' in r.text
    assert client.get("/console/static/console.css").headers["content-type"].startswith("text/css")


def test_routes_keep_their_scopes():
    from server.scopes import ROUTE_SCOPES, SIGNED_IN

    console_routes = {k: v for k, v in ROUTE_SCOPES.items() if k[1].startswith("/console")}
    assert console_routes[("POST", "/console/actions/{action_id}/approve")] == "actions"
    assert console_routes[("GET", "/console/actions")] == SIGNED_IN
    assert console_routes[("POST", "/console/memory/forget")] == "memory:admin"


def test_without_keys_the_operator_at_the_machine_needs_no_sign_in_but_forms_still_need_their_token(tmp_path, embedder):
    settings = load_settings(data_dir=tmp_path, rails=False, deployment="support")
    with TestClient(create_app(settings, engine=ScriptedEngine(served_model="scripted", max_model_len=1024), embedder=embedder), follow_redirects=False) as client:
        page = client.get("/console/actions")
        assert page.status_code == 200 and "Actions" in page.text
        token = _csrf(page.text)
        assert client.post("/console/actions/act_x/approve", data={CSRF_FIELD: "0" * 64}).status_code == 403
        assert client.post("/console/actions/act_x/approve", data={CSRF_FIELD: token}).status_code == 404  # past the checks: no such action
