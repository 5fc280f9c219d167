"""/v1/models and /v1/embeddings on the live server."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.e2e

EMBED = "all-MiniLM-L6-v2"


def test_list_models_has_chat_model_aliases_and_embedding_model(client, model_name):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == [model_name, "smollm2"] and EMBED in ids
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_create_embeddings_batch_is_normalised_and_semantic(client):
    texts = ["The cat sleeps on the sofa.", "A kitten naps on the couch.", "Invoice 4411 is overdue."]
    reply = client.embeddings.create(model=EMBED, input=texts)  # the client asks for base64 by default
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (3, 384) and [d.index for d in reply.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > len(texts)


def test_create_embeddings_float_and_base64_agree(live_server):
    def get(fmt):
        body = {"model": EMBED, "input": "hello world", "encoding_format": fmt}
        return httpx.post(f"{live_server.base_url}/embeddings", json=body, headers=live_server.headers()).json()["data"][0]["embedding"]

    floats = np.array(get("float"), dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(get("base64")), dtype="<f4")
    assert np.allclose(floats, decoded)


def test_create_embeddings_from_token_ids(client):
    from_text = client.embeddings.create(model=EMBED, input="hello world", encoding_format="float").data[0].embedding
    # 7592, 2088: "hello", "world" in the MiniLM vocabulary.
    from_ids = client.embeddings.create(model=EMBED, input=[7592, 2088], encoding_format="float").data[0].embedding
    assert np.allclose(from_text, from_ids, atol=1e-5)


def test_embeddings_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="smollm2", input="x")
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBED, input="x", dimensions=128)
    assert caught.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBED, input="word " * 600)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED, input=[])


def test_metrics_move_with_traffic(live_server, client):
    before_tokens = live_server.metric("enclave_generation_tokens_total")
    before_ttft = live_server.metric("enclave_time_to_first_token_seconds_count")
    before_http = live_server.metric("enclave_http_requests_total", route="/v1/chat/completions", status="200")
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert live_server.metric("enclave_generation_tokens_total") == before_tokens + reply.usage.completion_tokens
    assert live_server.metric("enclave_time_to_first_token_seconds_count") == before_ttft + 1
    assert live_server.metric("enclave_http_requests_total", route="/v1/chat/completions", status="200") == before_http + 1
    assert live_server.metric("enclave_ready") == 1
