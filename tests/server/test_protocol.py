from __future__ import annotations

import pytest

from server.errors import ContextLengthExceededError, InvalidRequestError
from server.protocol import JSON_OBJECT_SCHEMA, ChatCompletionRequest


def request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})


def test_developer_role_maps_to_system_and_parts_join():
    req = request(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.chat_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


def test_generation_params_from_request():
    params = request(max_tokens=5, temperature=0.2, stop="END", seed=9, logprobs=True, top_logprobs=3).to_generation_params(10, 100)
    assert (params.max_tokens, params.temperature, params.stop, params.seed, params.logprobs) == (5, 0.2, ("END",), 9, 3)
    assert request().to_generation_params(10, 100).logprobs is None


def test_context_checks():
    with pytest.raises(ContextLengthExceededError):
        request().to_generation_params(100, 100)
    with pytest.raises(ContextLengthExceededError) as caught:
        request(max_tokens=91).to_generation_params(10, 100)
    assert caught.value.param == "max_tokens"
    assert request(max_tokens=90).to_generation_params(10, 100).max_tokens == 90


def test_json_object_and_json_schema_formats():
    assert request(response_format={"type": "json_object"}).json_schema() == JSON_OBJECT_SCHEMA
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    assert request(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}).json_schema() == schema
    assert request(response_format={"type": "text"}).json_schema() is None


def test_invalid_combinations_are_refused():
    with pytest.raises(InvalidRequestError):
        request(stop=["a", "b", "c", "d", "e"]).to_generation_params(1, 100)
    with pytest.raises(InvalidRequestError):
        request(top_logprobs=2).to_generation_params(1, 100)
    with pytest.raises(InvalidRequestError):
        request(logit_bias={"1": 5}).to_generation_params(1, 100)


def test_unknown_fields_are_kept_aside_not_fatal():
    assert request(store=True, metadata={"a": "b"}).model_extra == {"store": True, "metadata": {"a": "b"}}
