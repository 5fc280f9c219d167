"""Two tenants whose customers have the same user name (acme's and beta's `cust_1001`):
neither reads, changes or refunds the other's records through any support tool, by chat
completions, by the Responses API or by confirming an action."""

from __future__ import annotations

import json
import sqlite3

import httpx
import openai
import pytest

from server.toolcalls.tenancy import tenant_database

pytestmark = pytest.mark.e2e

SUPPORT = [{"type": "server", "name": "support"}]
ACME_ONLY = ("USB-C dock", "Alice Martin", "alice@example.com", "ORD-5002 arrived", "Pro")


def _client(live_server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys[key], max_retries=0, timeout=120)


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def _responses_named(name: str) -> dict:
    return {"type": "function", "name": name}


def _rows(live_server, tenant: str, sql: str) -> list[tuple]:
    with sqlite3.connect(tenant_database(live_server.data_dir / "packs", "support", tenant)) as conn:
        return conn.execute(sql).fetchall()


def _ask(client: openai.OpenAI, text: str, tool: str, history: list[dict] | None = None):
    return client.chat.completions.create(
        model="smollm2", messages=[*(history or []), {"role": "user", "content": text}], tools=SUPPORT, tool_choice=_named(tool), temperature=0, max_tokens=120
    )


def _state(live_server) -> dict[str, list[tuple]]:
    """Every record of acme's support database."""
    tables = ("customers", "subscriptions", "orders", "tickets", "refunds", "handoffs")
    return {t: _rows(live_server, "acme", f"SELECT * FROM {t} ORDER BY 1") for t in tables}


@pytest.fixture(scope="module")
def acme_seen(live_server) -> None:
    """acme's own customer reads ticket T-1001 (which also opens acme's database)."""
    seen = _ask(_client(live_server, "support"), "What is the status of my ticket T-1001?", "lookup_ticket")
    assert "USB-C dock" in seen.model_extra["server_tool_calls"][0]["output"]


def test_beta_reads_none_of_acmes_records_by_chat(live_server, acme_seen):
    beta = _client(live_server, "beta")
    before = _state(live_server)
    ticket = _ask(beta, "What is the status of my ticket T-1001?", "lookup_ticket")
    call = ticket.model_extra["server_tool_calls"][0]
    assert json.loads(call["arguments"]) == {"ticket_id": "T-1001"} and call["status"] == "error", call
    subscription = _ask(beta, "Which plan am I on?", "check_subscription_status").model_extra["server_tool_calls"][0]
    assert subscription["status"] == "ok" and json.loads(subscription["output"])["plan"] == "Starter", subscription
    own = _ask(beta, "What is the status of my ticket T-2001?", "lookup_ticket").model_extra["server_tool_calls"][0]
    assert own["status"] == "ok" and "Keyboard keys stick" in own["output"], own
    for out in (ticket, subscription, own):
        text = json.dumps(out if isinstance(out, dict) else out.model_dump())
        assert not any(fact in text for fact in ACME_ONLY[:4]), text
    handoff = _ask(beta, "I want to talk to a person about my keyboard.", "handoff_to_agent").model_extra["server_tool_calls"][0]
    assert handoff["status"] == "ok", handoff
    assert _rows(live_server, "beta", "SELECT COUNT(*) FROM handoffs")[0][0] >= 1
    assert _state(live_server) == before  # acme's records: not a row changed


def test_beta_reads_none_of_acmes_records_by_responses(live_server):
    beta = _client(live_server, "beta")
    out = beta.responses.create(model="smollm2", input="What is the status of my ticket T-1001?", tools=SUPPORT, tool_choice=_responses_named("lookup_ticket"), temperature=0, max_output_tokens=120)
    call = out.model_extra["server_tool_calls"][0]
    assert json.loads(call["arguments"]) == {"ticket_id": "T-1001"} and call["status"] == "error", call
    assert "USB-C dock" not in json.dumps(out.model_dump(warnings=False))  # (our "server" tool type is not in the SDK's models)
    plan = beta.responses.create(model="smollm2", input="Which plan am I on?", tools=SUPPORT, tool_choice=_responses_named("check_subscription_status"), temperature=0, max_output_tokens=60)
    assert json.loads(plan.model_extra["server_tool_calls"][0]["output"])["plan"] == "Starter"


def test_beta_cannot_refund_acmes_order_or_confirm_acmes_action(live_server, acme_seen):
    beta, acme = _client(live_server, "beta"), _client(live_server, "support")
    before = _rows(live_server, "acme", "SELECT * FROM refunds ORDER BY id")
    # acme's order, asked for by beta's cust_1001: refused before any confirmation.
    asked = _ask(beta, "Refund 20.28 EUR on order ORD-5002, it arrived damaged.", "create_refund")
    call = asked.model_extra["server_tool_calls"][0]
    assert json.loads(call["arguments"])["order_id"] == "ORD-5002" and call["status"] == "error", call
    assert asked.model_extra.get("pending_action") is None
    # acme's own pending refund: beta can neither confirm it in chat nor approve it as operator.
    pending = _ask(acme, "Refund 10 EUR on order ORD-5001, I was charged twice.", "create_refund")
    action = pending.model_extra["pending_action"]
    assert action and action["status"] == "pending", pending.model_extra["server_tool_calls"]
    history = [{"role": "user", "content": "Refund 10 EUR on order ORD-5001."}, {"role": "assistant", "content": pending.choices[0].message.content}]
    confirmed = beta.chat.completions.create(model="smollm2", messages=[*history, {"role": "user", "content": "Yes, go ahead."}], tools=SUPPORT, temperature=0, max_tokens=40)
    assert confirmed.model_extra.get("pending_action") is None
    operator = live_server.headers(live_server.keys["beta_operator"])
    assert httpx.post(f"{live_server.base_url}/actions/{action['id']}/approve", headers=operator).status_code == 404
    assert httpx.post(f"{live_server.base_url}/actions/{action['id']}/cancel", headers=operator).status_code == 404
    assert action["id"] not in {a["id"] for a in httpx.get(f"{live_server.base_url}/actions", headers=operator).json()["data"]}
    mine = httpx.get(f"{live_server.base_url}/actions/{action['id']}", headers=live_server.headers(live_server.keys["operator"])).json()
    assert mine["status"] == "pending"
    assert _rows(live_server, "acme", "SELECT * FROM refunds ORDER BY id") == before
    cancelled = httpx.post(f"{live_server.base_url}/actions/{action['id']}/cancel", headers=live_server.headers(live_server.keys["operator"]))
    assert cancelled.json()["status"] == "cancelled"
    # beta's own order: refunded after beta's own confirmation, in beta's records only.
    own = _ask(beta, "Refund 10 EUR on order ORD-6001, I was charged twice.", "create_refund")
    assert own.model_extra["pending_action"], own.model_extra["server_tool_calls"]
    history = [{"role": "user", "content": "Refund 10 EUR on order ORD-6001."}, {"role": "assistant", "content": own.choices[0].message.content}]
    done = beta.chat.completions.create(model="smollm2", messages=[*history, {"role": "user", "content": "Yes, go ahead."}], tools=SUPPORT, temperature=0, max_tokens=40)
    assert done.model_extra["pending_action"]["status"] == "succeeded", done.model_dump()
    assert [r[1] for r in _rows(live_server, "beta", "SELECT id, order_id FROM refunds")] == ["ORD-6001"]
    assert _rows(live_server, "acme", "SELECT * FROM refunds ORDER BY id") == before
