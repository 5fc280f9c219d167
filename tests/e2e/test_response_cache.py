"""The response cache on the live server (opt-in there: requests send `"cache": true`):
an exact and a semantic hit that cost nothing and are marked in the response, the trace
and /metrics; tenants and, for personal answers, users never see each other's; a changed
knowledge source is a miss; the request can skip the lookup."""

from __future__ import annotations

import httpx
import openai

from tests.e2e.conftest import wait_indexed

CACHE = {"cache": True}


def _client(live_server, name: str | None = None) -> openai.OpenAI:
    key = live_server.keys[name] if name else live_server.key
    return openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0, timeout=300)


def _ask(c: openai.OpenAI, text: str, **extra):
    return c.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "system", "content": "You are the help desk of a shop."}, {"role": "user", "content": text}],
        temperature=0,
        max_tokens=24,
        extra_body={**CACHE, **extra},
    )


def _cache(out) -> dict:
    return out.model_extra["cache"]


def _spans(live_server, trace_id: str) -> list[dict]:
    # Read with the tenant's key that holds the traces scope.
    r = httpx.get(f"{live_server.base_url}/traces/{trace_id}", headers=live_server.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["spans"]


def test_a_repeated_or_rephrased_question_is_answered_from_the_cache(live_server):
    dana, eve, globex = _client(live_server, "dana"), _client(live_server, "eve"), _client(live_server, "globex")
    hits0 = {k: live_server.metric("enclave_response_cache_total", result=k) for k in ("hit_exact", "hit_semantic", "miss", "stored")}
    generated0 = live_server.metric("enclave_generation_tokens_total")

    first = _ask(dana, "How do I reset my password?").parse()
    assert _cache(first)["status"] == "miss" and _cache(first)["stored"].startswith("rc_")
    assert first.usage.completion_tokens > 0 and first.model_extra["cost"]["usd"] > 0
    answer = first.choices[0].message.content
    assert answer

    # The same question from another user of the tenant: the kept answer, no model run.
    raw = _ask(eve, "How do I reset my password?")
    again = raw.parse()
    assert _cache(again)["status"] == "hit" and _cache(again)["kind"] == "exact" and _cache(again)["id"] == _cache(first)["stored"]
    assert again.choices[0].message.content == answer and again.choices[0].finish_reason == first.choices[0].finish_reason
    assert again.usage.completion_tokens == 0 and again.usage.prompt_tokens == 0
    assert again.model_extra["cost"]["usd"] == 0
    spans = _spans(live_server, raw.headers["x-trace-id"])
    lookup = [s for s in spans if s["name"] == "cache lookup"]
    assert len(lookup) == 1 and lookup[0]["attributes"]["enclave.cache.result"] == "hit_exact"
    assert not any(s["name"].startswith("chat ") for s in spans)

    # Rephrased (cosine similarity 0.99 with the first): a semantic hit, streamed too.
    stream = dana.chat.completions.create(
        model="smollm2",
        messages=[{"role": "system", "content": "You are the help desk of a shop."}, {"role": "user", "content": "How can I reset my password?"}],
        temperature=0,
        max_tokens=24,
        stream=True,
        extra_body=CACHE,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    marked = [c.model_extra["cache"] for c in chunks if c.model_extra.get("cache")]
    assert marked and marked[-1]["kind"] == "semantic" and 0.9 <= marked[-1]["similarity"] < 1.0

    # Another tenant asking the very same question is never answered from acme's entry.
    other = _ask(globex, "How do I reset my password?").parse()
    assert _cache(other)["status"] == "miss"

    # The client may skip the lookup (and the answer is kept afresh).
    skipped = _ask(eve, "How do I reset my password?", cache={"no-cache": True}).parse()
    assert _cache(skipped)["status"] == "miss" and skipped.usage.completion_tokens > 0

    # A request that does not ask (the deployment is opt-in) neither looks up nor is marked.
    plain = dana.chat.completions.create(
        model="smollm2",
        messages=[{"role": "system", "content": "You are the help desk of a shop."}, {"role": "user", "content": "How do I reset my password?"}],
        temperature=0,
        max_tokens=24,
    )
    assert plain.model_extra.get("cache") is None and plain.usage.completion_tokens > 0

    moved = {k: live_server.metric("enclave_response_cache_total", result=k) - v for k, v in hits0.items()}
    assert moved == {"hit_exact": 1, "hit_semantic": 1, "miss": 3, "stored": 3}
    # Only the misses and the plain request generated anything.
    generated = live_server.metric("enclave_generation_tokens_total") - generated0
    assert generated == first.usage.completion_tokens + other.usage.completion_tokens + skipped.usage.completion_tokens + plain.usage.completion_tokens


def test_a_personal_answer_is_never_given_to_another_user(live_server):
    dana, eve = _client(live_server, "dana"), _client(live_server, "eve")
    question = "My email is dana.w@example.org, which newsletter am I subscribed to?"
    first = _ask(dana, question).parse()
    assert _cache(first)["status"] == "miss" and _cache(first)["stored"]
    # The same words from another user: their personal data would be dana's answer.
    assert _cache(_ask(eve, question).parse())["status"] == "miss"
    mine = _ask(dana, question).parse()
    assert _cache(mine)["status"] == "hit" and mine.choices[0].message.content == first.choices[0].message.content


def test_an_answer_is_not_given_once_its_knowledge_source_changed(live_server, client):
    store = client.vector_stores.create(name="cache-kb")
    doc = client.files.create(file=("returns.md", b"# Returns\n\nItems can be returned within 30 days of delivery.\n"), purpose="assistants")
    client.vector_stores.files.create_and_poll(vector_store_id=store.id, file_id=doc.id)
    alice = _client(live_server)
    q = "How many days do I have to return an item?"
    first = _ask(alice, q, vector_store_ids=[store.id]).parse()
    assert _cache(first)["status"] == "miss" and first.model_extra["citations"]
    assert _cache(_ask(alice, q, vector_store_ids=[store.id]).parse())["status"] == "hit"

    # The policy document is replaced: the kept answer must not outlive it.
    client.vector_stores.files.delete(vector_store_id=store.id, file_id=doc.id)
    new = client.files.create(file=("returns.md", b"# Returns\n\nItems can be returned within 14 days of delivery.\n"), purpose="assistants")
    client.vector_stores.files.create(vector_store_id=store.id, file_id=new.id)
    wait_indexed(client, store.id)
    after = _ask(alice, q, vector_store_ids=[store.id]).parse()
    assert _cache(after)["status"] == "miss"
    assert [c["file_id"] for c in after.model_extra["citations"]] == [new.id]
    # And the fresh answer is the one kept from now on.
    assert _cache(_ask(alice, q, vector_store_ids=[store.id]).parse())["id"] == _cache(after)["stored"]


def test_the_responses_api_is_answered_from_the_cache_too(live_server):
    frank = _client(live_server, "frank")

    def ask():
        return frank.responses.create(
            model="smollm2",
            instructions="You are the help desk of a shop.",
            input="Which payment methods do you accept?",
            store=False,
            temperature=0,
            max_output_tokens=24,
            extra_body=CACHE,
        )

    first, again = ask(), ask()
    assert first.model_extra["cache"]["status"] == "miss"
    assert again.model_extra["cache"]["status"] == "hit" and again.model_extra["cache"]["id"] == first.model_extra["cache"]["stored"]
    assert again.output_text == first.output_text and again.usage.output_tokens == 0
