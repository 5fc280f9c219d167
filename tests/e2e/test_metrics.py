"""/metrics on the live server moves with the work it describes: decode pace, tool calls
by tool and outcome, retrieval and memory-recall latency."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.e2e


def test_time_per_output_token_is_observed_per_generation(live_server, client, model_name):
    count = live_server.metric("enclave_time_per_output_token_seconds_count")
    total = live_server.metric("enclave_time_per_output_token_seconds_sum")
    client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "How long does delivery take?"}], max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert live_server.metric("enclave_time_per_output_token_seconds_count") == count + 1
    pace = live_server.metric("enclave_time_per_output_token_seconds_sum") - total
    assert 0 < pace < 1  # seconds per token: SmolLM2 on 2 cores is tens of milliseconds


def test_tool_calls_are_counted_by_tool_and_outcome(live_server):
    support = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["support"], max_retries=0, timeout=300)
    before = live_server.metric("enclave_tool_calls_total", tool="lookup_ticket", outcome="ok")
    out = support.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the status of my ticket T-1001?"}],
        tools=[{"type": "server", "name": "support"}],
        tool_choice={"type": "function", "function": {"name": "lookup_ticket"}},
        temperature=0,
        max_tokens=60,
    )
    ok = sum(1 for c in out.model_extra["server_tool_calls"] if c["name"] == "lookup_ticket" and c["status"] == "ok")
    assert ok >= 1
    assert live_server.metric("enclave_tool_calls_total", tool="lookup_ticket", outcome="ok") == before + ok


def test_retrieval_and_recall_latency_are_observed_per_turn(live_server, client, model_name):
    retrieval = live_server.metric("enclave_retrieval_latency_seconds_count")
    recall = live_server.metric("enclave_memory_recall_latency_seconds_count")
    store = client.vector_stores.create(name="metrics-kb").id
    client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "How long does delivery take?"}],
        max_tokens=4,
        extra_body={"conversation": "metrics-check", "vector_store_ids": [store]},
    )
    assert live_server.metric("enclave_retrieval_latency_seconds_count") == retrieval + 1
    assert live_server.metric("enclave_memory_recall_latency_seconds_count") == recall + 1
