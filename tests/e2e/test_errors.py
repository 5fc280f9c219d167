"""Bad input gets OpenAI-shaped errors with the right status and no internals."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MSG = [{"role": "user", "content": "hi"}]


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and "/" not in error["message"].replace("/v1/", "")
    if code is not None:
        assert error["code"] == code
    return error


def post(live_server, path: str, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{live_server.base_url}{path}", headers={**live_server.headers(), **(headers or {})}, timeout=60, **kwargs)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=3)
    assert caught.value.code == "model_not_found"


def test_malformed_json_is_400(live_server):
    response = post(live_server, "/chat/completions", content=b'{"model": "smollm2", "messages": [', headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "invalid_json")


def test_wrong_field_type_is_400_naming_the_param(live_server):
    error = assert_openai_error(post(live_server, "/chat/completions", json={"model": "smollm2", "messages": "hello"}), 400)
    assert error["param"] == "messages"
    error = assert_openai_error(post(live_server, "/chat/completions", json={"model": "smollm2", "messages": MSG, "temperature": "hot"}), 400)
    assert error["param"] == "temperature"


def test_missing_messages_is_400(live_server):
    error = assert_openai_error(post(live_server, "/chat/completions", json={"model": "smollm2"}), 400, "missing_required_parameter")
    assert error["param"] == "messages"


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "sea " * 9000}], max_tokens=3)
    assert caught.value.code == "context_length_exceeded"


def test_max_tokens_beyond_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=9000)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "max_tokens"


def test_schema_that_cannot_compile_is_400(client):
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}, "required": ["a"]}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=5,
                                       response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}})


def test_badly_named_tool_is_a_400_that_points_at_it(client):
    tool = {"type": "function", "function": {"name": "no spaces allowed", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=MSG, tools=[tool], max_tokens=3)
    assert caught.value.param == "tools[0].function.name"


def test_oversized_body_is_413(live_server):
    response = post(live_server, "/chat/completions", json={"model": "smollm2", "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]})
    assert_openai_error(response, 413, "request_too_large")


def test_unknown_route_is_404_openai_shaped(live_server):
    assert_openai_error(httpx.get(f"{live_server.base_url}/nothing-here", headers=live_server.headers()), 404, "unknown_url")


def test_client_disconnect_mid_stream_aborts_generation(live_server):
    before = live_server.metric("enclave_requests_aborted_total", reason="client_disconnected")
    body = {"model": "smollm2", "messages": MSG, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live_server.base_url}/chat/completions", json=body, headers=live_server.headers(), timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    closed_at = time.monotonic()
    while True:
        aborted = live_server.metric("enclave_requests_aborted_total", reason="client_disconnected")
        unfinished = live_server.metric("enclave_engine_unfinished_requests")
        if aborted == before + 1 and unfinished == 0:
            break
        assert time.monotonic() - closed_at < 1.0, f"not aborted within 1 s (aborted={aborted}, unfinished={unfinished})"
        time.sleep(0.05)
    assert live_server.metric("enclave_requests_running") == 0


def test_client_disconnect_without_stream_aborts_generation(live_server):
    before = live_server.metric("enclave_requests_aborted_total", reason="client_disconnected")
    body = {"model": "smollm2", "messages": MSG, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.base_url}/chat/completions", json=body, headers=live_server.headers(), timeout=1.0)
    closed_at = time.monotonic()
    while live_server.metric("enclave_requests_aborted_total", reason="client_disconnected") != before + 1 \
            or live_server.metric("enclave_engine_unfinished_requests") != 0:
        assert time.monotonic() - closed_at < 1.0, "generation still running 1 s after the client left"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ],
)
def test_sampling_values_the_engine_cannot_take_are_400(live_server, body, param):
    response = post(live_server, "/chat/completions", json={"model": "smollm2", "messages": MSG, "max_tokens": 8, **body})
    assert assert_openai_error(response, 400)["param"] == param


def test_the_largest_seed_is_taken(client):
    reply = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=2, seed=2**63 - 1)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("tokens", [[10**12], [-1, -2], [[1, 2], [99_999_999]]])
def test_embedding_token_ids_outside_the_vocabulary_are_400(live_server, tokens):
    response = post(live_server, "/embeddings", json={"model": "all-MiniLM-L6-v2", "input": tokens})
    assert assert_openai_error(response, 400)["param"] == "input"


def test_client_strings_cannot_forge_a_log_line(live_server):
    forged = "ERROR enclave: forged by a client"
    body = {"model": "smollm2", "messages": MSG, "max_tokens": 2, f"x\n{forged}": 1, "note\r\x1b[31m": "y"}
    assert post(live_server, "/chat/completions", json=body).status_code == 200
    time.sleep(0.5)
    lines = live_server.log_path.read_text().splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any("x\\nERROR enclave: forged by a client" in line for line in lines)
    assert not any("\x1b" in line for line in lines)
