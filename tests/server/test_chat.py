"""Orchestration of chat completions over the ScriptedEngine (no model loaded)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.auth import KeyStore
from server.config import load_settings
from server.engine.scripted import ScriptedEngine


@pytest.fixture
def engine():
    return ScriptedEngine(served_model="scripted", max_model_len=64)


@pytest.fixture
def api(engine, tmp_path):
    settings = load_settings(data_dir=tmp_path, max_request_bytes=4096)
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def chat(api, **body):
    return api.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}], **body})


def sse(response) -> list:
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_complete_assembles_text_and_counts_usage(api, engine):
    engine.queue("Hello there friend")
    body = chat(api, max_tokens=10).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there friend", "refusal": None, "tool_calls": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": len(engine.calls[0].prompt_token_ids), "completion_tokens": 3, "total_tokens": len(engine.calls[0].prompt_token_ids) + 3}


def test_max_tokens_defaults_to_the_rest_of_the_window(api, engine):
    chat(api)
    assert engine.calls[0].params.max_tokens == 64 - len(engine.calls[0].prompt_token_ids)


def test_max_completion_tokens_wins_over_max_tokens(api, engine):
    engine.queue("a b c d e f")
    body = chat(api, max_tokens=10, max_completion_tokens=2).json()
    assert engine.calls[0].params.max_tokens == 2
    assert body["choices"][0]["finish_reason"] == "length"


def test_stream_sends_role_then_deltas_then_usage(api, engine):
    engine.queue("one two three")
    events = sse(chat(api, stream=True, stream_options={"include_usage": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert text == "one two three"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_stream_without_usage_option_has_no_usage_field(api, engine):
    events = sse(chat(api, stream=True))
    assert all("usage" not in e for e in events)


def test_n_choices_are_collected_by_index(api, engine):
    engine.queue("first", "second one")
    body = chat(api, n=2).json()
    assert [c["message"]["content"] for c in body["choices"]] == ["first", "second one"]
    assert body["usage"]["completion_tokens"] == 3


def test_stop_strings_reach_the_engine_and_cut(api, engine):
    engine.queue("alpha beta gamma")
    body = chat(api, stop="gamma").json()
    assert engine.calls[0].params.stop == ("gamma",)
    assert body["choices"][0]["message"]["content"] == "alpha beta "


def test_response_format_becomes_a_schema_constraint(api, engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat(api, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert engine.calls[0].params.json_schema == schema


def test_logprobs_shape(api, engine):
    engine.queue("x y")
    body = chat(api, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["x", " y"] and len(content[0]["top_logprobs"]) == 2


def test_context_overflow_is_400_before_the_engine(api, engine):
    response = chat(api, messages=[{"role": "user", "content": "w " * 100}])
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert engine.calls == []


def test_unknown_model_is_404(api):
    response = api.post("/v1/chat/completions", json={"model": "other", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_image_parts_are_refused(api):
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    response = chat(api, messages=[{"role": "user", "content": parts}])
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content.0"


def test_body_over_cap_is_413(api):
    response = chat(api, messages=[{"role": "user", "content": "x" * 5000}])
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_metrics_count_tokens_and_finishes(api, engine):
    engine.queue("a b")
    chat(api)
    text = api.get("/metrics").text
    assert 'enclave_generation_tokens_total{model="scripted"} 2.0' in text
    assert 'enclave_requests_finished_total{finish_reason="stop",model="scripted"} 1.0' in text
    assert 'enclave_requests_running{model="scripted"} 0.0' in text


def test_stream_closed_early_aborts_in_engine(engine, tmp_path):
    engine.queue("word " * 200)
    engine.token_delay = 0.01
    settings = load_settings(data_dir=tmp_path)
    app = create_app(settings, engine=engine)
    with TestClient(app) as api:
        with api.stream("POST", "/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 50}) as response:
            lines = response.iter_lines()
            next(lines)
            next(lines)
        # The server notices the close on its next write; give it a moment.
        for _ in range(100):
            text = api.get("/metrics").text
            if 'reason="client_disconnected"} 1.0' in text:
                break
            time.sleep(0.01)
    assert engine.aborted == {engine.calls[0].request_id}
    assert 'enclave_requests_aborted_total{model="scripted",reason="client_disconnected"} 1.0' in text


def test_keys_gate_every_route_but_health(engine, tmp_path):
    settings = load_settings(data_dir=tmp_path)
    secret, _ = KeyStore(settings.resolved_keys_file).create("t", "u", ["models"])
    with TestClient(create_app(settings, engine=engine)) as api:
        assert api.get("/health").status_code == 200
        assert api.get("/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {secret}"}
        assert api.get("/v1/models", headers=auth).status_code == 200
        denied = api.post("/v1/chat/completions", headers=auth, json={"model": "scripted", "messages": [{"role": "user", "content": "x"}]})
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"


def test_embeddings_before_the_embedder_loads_are_503(api):
    response = api.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"


def test_unexpected_errors_hide_internals(engine, tmp_path):
    def broken(messages):
        raise RuntimeError("secret path /srv/enclave/internal")

    engine.render_chat = broken
    with TestClient(create_app(load_settings(data_dir=tmp_path), engine=engine), raise_server_exceptions=False) as api:
        response = chat(api)
    assert response.status_code == 500
    assert "secret" not in response.text and response.json()["error"]["type"] == "server_error"
