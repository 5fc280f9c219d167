"""Indexing of uploads on the live server: off the request path, refused when hostile,
cancellable, and taken up again after the server is killed mid-file."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.e2e.conftest import start
from tests.e2e.handbook import deep_page_tree_pdf, many_pages_pdf

pytestmark = pytest.mark.e2e

SENTENCE = "Customers may return a damaged item within thirty days of delivery for a full refund."


def _document(chunks: int) -> bytes:
    return "\n\n".join(f"Part {i}. " + " ".join([SENTENCE] * 10) for i in range(chunks)).encode()


def _status(live_server, store: str, file_id: str) -> dict:
    return httpx.get(f"{live_server.base_url}/vector_stores/{store}/files/{file_id}", headers=live_server.headers(), timeout=30).json()


def _settle(live_server, store: str, file_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (row := _status(live_server, store, file_id))["status"] == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.5)
    return row


def test_hostile_documents_fail_with_a_last_error(client):
    store = client.vector_stores.create(name="hostile")
    cases = {"pages.pdf": (many_pages_pdf(2001), "file_too_large"), "deep.pdf": (deep_page_tree_pdf(), "invalid_file")}
    for name, (data, code) in cases.items():
        uploaded = client.files.create(file=(name, data), purpose="assistants")
        done = client.vector_stores.files.create_and_poll(vector_store_id=store.id, file_id=uploaded.id, poll_interval_ms=200)
        assert done.status == "failed" and done.last_error.code == code, (name, done)
    assert client.vector_stores.retrieve(store.id).file_counts.failed == 2


def test_chat_goes_on_while_a_large_upload_is_indexed_and_the_upload_can_be_cancelled(live_server, client, model_name):
    store = client.vector_stores.create(name="large")
    uploaded = client.files.create(file=("large.txt", _document(400)), purpose="assistants")
    started = time.monotonic()
    queued = client.vector_stores.files.create(vector_store_id=store.id, file_id=uploaded.id)
    assert queued.status == "in_progress" and time.monotonic() - started < 5
    reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content
    assert _status(live_server, store.id, uploaded.id)["status"] == "in_progress"  # the chat did not wait for it
    client.vector_stores.files.delete(file_id=uploaded.id, vector_store_id=store.id)
    time.sleep(3)  # the worker finds its file gone at its next batch
    hits = httpx.post(f"{live_server.base_url}/vector_stores/{store.id}/search", headers=live_server.headers(), json={"query": "damaged item refund"}, timeout=30)
    assert hits.json()["data"] == []


def test_a_file_being_indexed_when_the_server_is_killed_is_finished_after_restart(live_server, client):
    store = client.vector_stores.create(name="killed")
    uploaded = client.files.create(file=("policy.txt", _document(150)), purpose="assistants")
    client.vector_stores.files.create(vector_store_id=store.id, file_id=uploaded.id)
    time.sleep(2)
    assert _status(live_server, store.id, uploaded.id)["status"] == "in_progress"
    os.killpg(live_server.process.pid, signal.SIGKILL)  # as the OOM killer would
    live_server.process.wait()
    start(live_server)
    done = _settle(live_server, store.id, uploaded.id)
    assert done["status"] == "completed" and done["chunks"] >= 150, done
    hits = httpx.post(f"{live_server.base_url}/vector_stores/{store.id}/search", headers=live_server.headers(), json={"query": "damaged item refund"}, timeout=30).json()["data"]
    assert hits and hits[0]["file_id"] == uploaded.id
