"""Routing (server/routing.py) through the real app: the `auto` alias over two scripted
tiers, the packaged embedding model for the classifier, conversation signals read from
SQLite, fallback when a tier is down. The e2e routing test runs it on real engines."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert

from server.app import create_app
from server.auth import KeyStore, Principal
from server.config import load_settings
from server.db import connect, conversations, sqlite_url, tool_audit, usage_records
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.errors import ConfigError
from server.profiles import ModelProfile
from server.routing import (
    Decision,
    ModelRouter,
    RouteRequest,
    RoutingConfig,
    has_failed_tool_result,
    last_user_text,
)

ROUTINE = "Where is my parcel?"
ANGRY = "This is the third time I am writing. I want to speak to a manager and file a formal complaint."


def _profile(name: str, tier: str, cost: float) -> ModelProfile:
    source = {"kind": "local_dir", "path": "unused"}
    return ModelProfile(name=name, source=source, context_length=512, device="cpu", tier=tier, cost_per_hour=cost)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


@pytest.fixture
def routed(tmp_path, embedder):
    keys = KeyStore(tmp_path / "keys.json")
    plain, _ = keys.create("acme", "ann", ["chat", "traces", "models"])
    vip, vip_record = keys.create("acme", "victor", ["chat", "traces"])
    routing = {"tiers": {"small": "tier-small", "large": "tier-large"}, "key_rules": [{"key_id": vip_record["id"], "tier": "large"}]}
    # The served model's price is overridden ($3600/h); the large tier keeps its profile's ($36/h).
    settings = load_settings(data_dir=tmp_path, rails=False, routing=routing, cost_per_hour=3600.0, deployment="support")
    small = ScriptedEngine(served_model="tier-small", max_model_len=400, token_delay=0.002)
    large = ScriptedEngine(served_model="tier-large", max_model_len=300, token_delay=0.002)
    app = create_app(settings, engine=small, embedder=embedder, others=[(_profile("tier-large", "large", 36.0), large)])
    with TestClient(app) as client:
        yield client, small, large, {"plain": plain, "vip": vip}


def _ask(client, key: str, text: str, **extra) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_routine_turns_go_to_the_small_tier_and_say_so(routed):
    client, small, large, keys = routed
    small.queue("On its way.")
    r = _ask(client, keys["plain"], ROUTINE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tier-small" and body["choices"][0]["message"]["content"] == "On its way."
    route = body["routing"]
    assert (route["alias"], route["tier"], route["model"], route["reason"]) == ("auto", "small", "tier-small", "default")
    assert route["scores"]["routine"] > route["scores"]["escalation"]
    assert r.headers["x-enclave-model"] == "tier-small" and r.headers["x-enclave-route"] == "default"
    assert len(small.calls) == 1 and not large.calls


def test_an_escalation_goes_to_the_large_tier_and_the_trace_says_why(routed):
    client, small, large, keys = routed
    large.queue("I am sorry; a manager will call you.")
    r = _ask(client, keys["plain"], ANGRY)
    body = r.json()
    assert body["model"] == "tier-large" and body["routing"]["reason"] == "classifier", body
    assert body["routing"]["scores"]["escalation"] > body["routing"]["scores"]["routine"]
    assert large.calls and not small.calls
    trace = client.get(f"/v1/traces/{r.headers['x-trace-id']}", headers={"Authorization": f"Bearer {keys['plain']}"}).json()
    spans = {s["name"]: s for s in trace["spans"]}
    assert spans["route auto"]["attributes"]["enclave.route.reason"] == "classifier"
    root = spans["invoke_agent enclave"]["attributes"]
    assert root["gen_ai.request.model"] == "auto" and root["gen_ai.response.model"] == "tier-large" and root["enclave.route.tier"] == "large"
    assert "chat tier-large" in spans


def test_each_tier_is_costed_at_its_own_price_and_a_stream_says_where_it_went(routed):
    client, small, large, keys = routed
    small.queue("On its way to you.")
    large.queue("A manager will call you today.")
    for text, price in ((ROUTINE, 3600.0), (ANGRY, 36.0)):
        cost = _ask(client, keys["plain"], text).json()["cost"]
        assert cost["engine_seconds"] > 0 and cost["usd"] == pytest.approx(cost["engine_seconds"] * price / 3600, rel=1e-3)
    small.queue("Soon.")
    body = {"model": "auto", "messages": [{"role": "user", "content": ROUTINE}], "max_tokens": 8, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {keys['plain']}"}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.headers["x-enclave-model"] == "tier-small"
    assert {c["model"] for c in chunks} == {"tier-small"} and any(c.get("routing", {}).get("tier") == "small" for c in chunks)


def test_a_key_rule_wins_over_the_classifier(routed):
    client, _small, large, keys = routed
    large.queue("Hello.")
    body = _ask(client, keys["vip"], ROUTINE).json()
    assert (body["routing"]["tier"], body["routing"]["reason"]) == ("large", "key_rule")


def test_a_failed_tool_call_escalates(routed):
    client, _small, large, keys = routed
    large.queue("Let me look into it.")
    messages = [
        {"role": "user", "content": ROUTINE},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "track", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"error": "tracking service timed out"}'},
    ]
    tools = [{"type": "function", "function": {"name": "track", "parameters": {"type": "object", "properties": {}}}}]
    r = client.post("/v1/chat/completions", json={"model": "auto", "messages": messages, "tools": tools, "max_tokens": 8}, headers={"Authorization": f"Bearer {keys['plain']}"})
    assert r.json()["routing"]["reason"] == "failed_tool_call", r.text


def test_an_escalated_conversation_stays_on_the_large_tier(routed):
    client, small, large, keys = routed
    large.queue("A manager will call you.", "Tomorrow morning.")
    first = _ask(client, keys["plain"], ANGRY, conversation="case-7").json()
    assert first["routing"]["tier"] == "large"
    # A routine follow-up in the same conversation: the escalation sticks.
    second = _ask(client, keys["plain"], "When?", conversation="case-7").json()
    assert (second["routing"]["tier"], second["routing"]["reason"]) == ("large", "escalated_conversation")
    # Another conversation of the same user starts afresh.
    small.queue("Hello.")
    assert _ask(client, keys["plain"], ROUTINE, conversation="case-8").json()["routing"]["tier"] == "small"


def test_a_tier_that_is_down_falls_back_and_the_response_says_so(routed):
    client, small, large, keys = routed
    large.up = False
    small.queue("Sorry to hear that.")
    body = _ask(client, keys["plain"], ANGRY).json()
    route = body["routing"]
    assert body["model"] == "tier-small" and route["tier"] == "small" and route["fallback_from"] == "large"
    assert route["reason"] == "classifier; fallback: large unavailable"


def test_a_tier_found_down_by_the_turn_itself_is_retried_on_the_fallback_unseen(routed):
    client, small, large, keys = routed
    auth = {"Authorization": f"Bearer {keys['plain']}"}
    # The large tier looks up but its upstreams refuse the turn's first model call.
    large.outage = True
    small.queue("Sorry to hear that.", "We are on it.")
    r = _ask(client, keys["plain"], ANGRY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tier-small" and body["routing"]["fallback_from"] == "large" and not large.up
    assert r.headers["x-enclave-route"] == "classifier; fallback: large unavailable"
    # Streaming: the same, before the first byte is sent.
    large.up, large.outage = True, True
    stream = {"model": "auto", "messages": [{"role": "user", "content": ANGRY}], "max_tokens": 8, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=stream, headers=auth) as s:
        assert s.status_code == 200 and s.headers["x-enclave-model"] == "tier-small"
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "We are on it."
    # A model asked for by name is not rerouted: its outage is the client's 503.
    large.up, large.outage = True, True
    named = client.post("/v1/chat/completions", json={"model": "tier-large", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, headers=auth)
    assert named.status_code == 503 and named.json()["error"]["code"] == "upstream_unavailable"


def test_models_list_the_alias_and_both_tiers_and_a_named_model_is_not_routed(routed):
    client, _small, large, keys = routed
    auth = {"Authorization": f"Bearer {keys['plain']}"}
    cards = {c["id"]: c for c in client.get("/v1/models", headers=auth).json()["data"]}
    assert {"auto", "tier-small", "tier-large"} <= set(cards)
    assert cards["auto"]["max_model_len"] == 300 and cards["tier-large"]["root"] == "tier-large"
    large.queue("Hi.")
    body = client.post("/v1/chat/completions", json={"model": "tier-large", "messages": [{"role": "user", "content": ANGRY}], "max_tokens": 4}, headers=auth).json()
    assert body["model"] == "tier-large" and body.get("routing") is None
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_responses_api_is_routed_too(routed):
    client, _small, large, keys = routed
    large.queue("A manager will call you.")
    r = client.post("/v1/responses", json={"model": "auto", "input": ANGRY, "max_output_tokens": 8}, headers={"Authorization": f"Bearer {keys['plain']}"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tier-large" and r.json()["routing"]["tier"] == "large"


def test_routing_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown tier"):
        load_settings(routing={"tiers": {"small": "a"}, "escalation_tier": "large"})
    with pytest.raises(ConfigError, match="key_id, tenant or user"):
        load_settings(routing={"tiers": {"small": "a"}, "key_rules": [{"tier": "small"}]})
    config = RoutingConfig(tiers={"s": "a", "m": "b", "l": "c"})
    assert (config.default_tier, config.escalation_tier) == ("s", "l")
    assert config.fallback_order("l") == ["m", "s"] and config.fallback_order("m") == ["s", "l"]
    assert RoutingConfig(tiers={"s": "a", "l": "c"}, fallbacks={"l": []}).fallback_order("l") == []


def test_signals_from_messages():
    assert last_user_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": [{"type": "text", "text": "c"}]}]) == "c"
    assert has_failed_tool_result([{"role": "tool", "content": "Error: no such order"}])
    assert has_failed_tool_result([{"role": "tool", "content": '{"error": "x"}'}])
    assert not has_failed_tool_result([{"role": "tool", "content": '{"status": "shipped"}'}])


class _Tier:
    def __init__(self, model: str):
        self.model = model
        self.up = True

    def available(self) -> bool:
        return self.up


def test_conversation_signals_are_read_from_the_shared_database(tmp_path):
    db = connect(sqlite_url(tmp_path / "enclave.db"))
    tiers = {"tier-small": _Tier("tier-small"), "tier-large": _Tier("tier-large")}
    router = ModelRouter(RoutingConfig(tiers={"small": "tier-small", "large": "tier-large"}), tiers, None, db)  # type: ignore[arg-type]
    ann = Principal(tenant="acme", user="ann", scopes=("*",))
    usage = {"tenant": "acme", "user": "ann", "conversation_id": "conv_1", "prompt_tokens": 1, "completion_tokens": 1, "engine_seconds": 0.0, "cost_usd": 0.0, "duration_s": 0.0}
    with db.begin() as conn:
        conn.execute(insert(conversations).values(id="conv_1", tenant="acme", user="ann", name="case-9", created_at=1.0))
        conn.execute(insert(usage_records).values(request_id="r1", at=1.0, model="tier-small", **usage))
        conn.execute(insert(tool_audit).values(at=1.0, request_id="r1", tool="handoff_to_agent", status="ok"))

    def route(principal: Principal = ann, conversation: str = "case-9") -> Decision:
        return asyncio.run(router.route(principal, RouteRequest("Thanks.", conversation)))[1]

    assert (route().tier, route().reason) == ("large", "escalation_tool")
    # The next turn, served small, ran a lookup that failed: still an escalation.
    with db.begin() as conn:
        conn.execute(insert(usage_records).values(request_id="r2", at=2.0, model="tier-small", **usage))
        conn.execute(insert(tool_audit).values(at=2.0, request_id="r2", tool="lookup_ticket", status="error"))
    assert route().reason == "failed_tool_call"
    # A turn on the large tier makes the escalation stick; by its id the same.
    with db.begin() as conn:
        conn.execute(insert(usage_records).values(request_id="r3", at=3.0, model="tier-large", **usage))
    assert route().reason == "escalated_conversation" and route(conversation="conv_1").reason == "escalated_conversation"
    # Another user's conversation of the same name says nothing about this one.
    assert route(Principal(tenant="acme", user="bob", scopes=("*",))).reason == "default"
    # No classifier without an embedding model: the default tier, unless it is down.
    assert route(conversation="new").tier == "small"
    tiers["tier-small"].up = False
    assert route(conversation="new").reason == "default; fallback: small unavailable"
    db.dispose()
