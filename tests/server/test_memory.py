"""Memory orchestration over the ScriptedEngine: real Chroma and SQLite in a temp dir,
the real packaged embedding model (no chat model loaded)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.errors import ConfigError
from server.memory.chunking import chunk_sections, extract_sections, split_sentences
from server.memory.episodic import extract_facts
from server.memory.vectors import ChromaCollections
from server.memory.window import ContextWindow
from tests.e2e.handbook import SHIPPING_HTML, WARRANTY_LINES, tiny_pdf


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


@pytest.fixture
def engine():
    return ScriptedEngine(served_model="scripted", max_model_len=400)


@pytest.fixture
def api(engine, embedder, tmp_path):
    # Memory orchestration alone: the rails have their own tests (test_guard.py).
    settings = load_settings(data_dir=tmp_path, context_output_reserve=40, summary_tokens=60, rails=False)
    with TestClient(create_app(settings, engine=engine, embedder=embedder)) as client:
        yield client


# ---------------------------------------------------------------- chunking


def test_chunks_respect_headings_sentences_and_overlap():
    body = " ".join(f"Sentence number {i} says something about topic {i}." for i in range(40))
    sections = extract_sections("guide.md", f"# Guide\n\n## Part A\n\n{body}\n\n## Part B\n\nShort tail.".encode())
    count = lambda texts: [len(t.split()) for t in texts]  # noqa: E731 - a word count stands in for a tokenizer
    chunks = chunk_sections(sections, count, target=60, overlap=12)
    a = [c for c in chunks if c.heading == "Guide > Part A"]
    assert len(a) > 2 and chunks[-1].text == "Guide > Part B\nShort tail."
    for chunk in a:
        assert chunk.text.startswith("Guide > Part A\n") and chunk.tokens <= 60
        assert chunk.text.rstrip().endswith(".")  # never cut inside a sentence
    for prev, nxt in zip(a, a[1:]):
        last = split_sentences(prev.text.split("\n", 1)[1])[-1]
        assert nxt.text.split("\n", 1)[1].startswith(last)  # the overlap carries the last sentence


def test_html_and_pdf_become_sections():
    html = extract_sections("shipping.html", SHIPPING_HTML.encode())
    assert [s.headings for s in html] == [("Shipping", "Delivery times"), ("Shipping", "International orders")]
    assert not any("Home | Help" in p for s in html for p in s.paragraphs)  # navigation dropped
    pdf = extract_sections("warranty.pdf", tiny_pdf(WARRANTY_LINES))
    assert "three year hardware warranty" in " ".join(pdf[0].paragraphs)


def test_facts_are_first_person_statements():
    assert extract_facts("Hi. My dog is called Biscuit. What time is it? I live in Ghent.") == ["My dog is called Biscuit.", "I live in Ghent."]


# ---------------------------------------------------------------- the vector store


def test_a_chroma_token_needs_a_chroma_server(tmp_path):
    with pytest.raises(ConfigError, match="ENCLAVE_CHROMA_URL is not"):
        ChromaCollections.open(tmp_path, None, "t0ken")
    # Nothing listens on port 9 (discard): unreachable is told apart from refused.
    with pytest.raises(ConfigError, match="cannot reach the Chroma server") as err:
        ChromaCollections.open(tmp_path, "http://127.0.0.1:9", "t0ken")
    assert "t0ken" not in str(err.value)


# ---------------------------------------------------------------- the window


def test_window_folds_old_turns_into_a_summary_under_budget(engine):
    turns = [(d, [{"role": "user", "content": f"message {d} " + "word " * 20}, {"role": "assistant", "content": "fine " * 5}]) for d in range(1, 30)]
    engine.queue("The user sent many messages about words and the assistant said fine each time.")
    window = asyncio.run(ContextWindow(engine, 60).assemble("Be brief.", [], turns, "", 0, [{"role": "user", "content": "next"}], 300, "t"))
    assert window.new_summary is not None and window.new_summary[1] == window.summary_through
    assert 0 < window.verbatim_turns < 29 and window.summary_through == 29 - window.verbatim_turns
    assert len(engine.render_chat(window.messages)) <= 300
    assert "Summary of the earlier conversation:\nThe user sent many" in window.messages[0]["content"]
    summary_call = engine.calls[-1]
    assert "-summary-" in summary_call.request_id and summary_call.params.temperature == 0.0


def test_window_refuses_only_an_input_that_alone_is_too_long(engine):
    from server.errors import ContextLengthExceededError

    with pytest.raises(ContextLengthExceededError):
        asyncio.run(ContextWindow(engine, 60).assemble("", [], [], "", 0, [{"role": "user", "content": "word " * 500}], 300, "t"))


def test_optional_blocks_are_dropped_before_the_input_is(engine):
    blocks = ["Sources:\n" + "fact " * 150, "Memory:\n" + "note " * 150]
    window = asyncio.run(ContextWindow(engine, 20).assemble("", blocks, [], "", 0, [{"role": "user", "content": "hello " * 50}], 300, "t"))
    assert window.dropped_blocks and len(engine.render_chat(window.messages)) <= 300


# ---------------------------------------------------------------- through the API


def test_conversation_survives_sixty_turns_and_forks(api, engine):
    first = None
    for i in range(60):
        r = api.post("/v1/chat/completions", json={"model": "scripted", "conversation": "c1", "messages": [{"role": "user", "content": f"turn {i} " + "filler " * 12}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] <= 400 - 4
        first = first or r.json()["id"]
    assert r.json()["context_window"]["summarized_turns"] > 0
    # Continue from the first turn: a fork sees only that turn, not the other 59.
    engine.calls.clear()
    fork = api.post("/v1/responses", json={"model": "scripted", "input": "fork", "previous_response_id": first}).json()
    assert fork["context_window"] == {"verbatim_turns": 1, "summarized_turns": 0, "summary_refreshed": False}


def test_memory_is_scoped_to_its_user(api, tmp_path):
    from server.auth import KeyStore

    store = KeyStore(tmp_path / "keys.json")
    a, _ = store.create("t1", "ann", ["chat"])
    b, _ = store.create("t1", "ben", ["chat"])
    c, _ = store.create("t2", "ann", ["chat"])  # the same user name in another tenant
    post = lambda key, text: api.post("/v1/responses", headers={"Authorization": f"Bearer {key}"}, json={"model": "scripted", "input": text}).json()  # noqa: E731
    post(a, "My favourite colour is teal.")
    assert [m["text"] for m in post(a, "What is my favourite colour?")["recalled_memories"]] == ["My favourite colour is teal."]
    assert post(b, "What is my favourite colour?")["recalled_memories"] == []
    assert post(c, "What is my favourite colour?")["recalled_memories"] == []


def test_stored_response_round_trip_and_delete(api):
    made = api.post("/v1/responses", json={"model": "scripted", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}]}).json()
    assert api.get(f"/v1/responses/{made['id']}").json() == made
    assert api.delete(f"/v1/responses/{made['id']}").json()["deleted"] is True
    gone = api.get(f"/v1/responses/{made['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "response_id"
    unstored = api.post("/v1/responses", json={"model": "scripted", "input": "hi", "store": False}).json()
    assert unstored["conversation"] is None and api.get(f"/v1/responses/{unstored['id']}").status_code == 404


def test_responses_stream_event_order(api, engine):
    engine.queue("one two")
    with api.stream("POST", "/v1/responses", json={"model": "scripted", "input": "hi", "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "one two"


def indexed(api, store: str, file_id: str, timeout: float = 60) -> dict:
    """The store file once the ingestion workers are done with it."""
    deadline = time.monotonic() + timeout
    while True:
        row = api.get(f"/v1/vector_stores/{store}/files/{file_id}").json()
        if row["status"] != "in_progress" or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def test_replacing_a_file_by_name_replaces_its_chunks(api):
    store = api.post("/v1/vector_stores", json={"name": "kb"}).json()["id"]

    def add(text: str) -> dict:
        f = api.post("/v1/files", files={"file": ("faq.md", text.encode())}, data={"purpose": "assistants"}).json()
        queued = api.post(f"/v1/vector_stores/{store}/files", json={"file_id": f["id"]}).json()
        assert queued["status"] == "in_progress"
        return indexed(api, store, f["id"])

    add("# FAQ\n\nThe office opens at nine.")
    assert add("# FAQ\n\nThe office opens at ten.")["status"] == "completed"
    hits = api.post(f"/v1/vector_stores/{store}/search", json={"query": "when does the office open"}).json()["data"]
    assert [h["content"][0]["text"] for h in hits] == ["FAQ\nThe office opens at ten."]
    bad = api.post("/v1/files", files={"file": ("tool.exe", b"MZ")}, data={"purpose": "assistants"}).json()
    refused = api.post(f"/v1/vector_stores/{store}/files", json={"file_id": bad["id"]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_file"
