"""Indexing of vector-store files off the request path, over the ScriptedEngine with the
real embedder, SQLite and Chroma on disk: limits, cancellation, restarts, fairness."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.db import vector_store_files
from server.embedder import Embedder, EmbeddingGate, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.memory import ingestion
from tests.e2e.handbook import deep_page_tree_pdf, many_pages_pdf

SENTENCE = "Refunds of damaged items are paid within five business days of the return."


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


@pytest.fixture
def make_api(tmp_path, embedder):
    """A server over one data directory; a second call is the same server restarted."""

    def make(**settings):
        app = create_app(load_settings(data_dir=tmp_path, **settings), engine=ScriptedEngine(served_model="scripted", max_model_len=512), embedder=embedder)
        return TestClient(app)

    return make


def _upload(api, name: str, data: bytes, store: str) -> str:
    file_id = api.post("/v1/files", files={"file": (name, data)}, data={"purpose": "assistants"}).json()["id"]
    queued = api.post(f"/v1/vector_stores/{store}/files", json={"file_id": file_id})
    assert queued.status_code == 200 and queued.json()["status"] == "in_progress", queued.text
    return file_id


def _settled(api, store: str, file_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = api.get(f"/v1/vector_stores/{store}/files/{file_id}").json()
        if row.get("status") != "in_progress" or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def _text(chunks: int) -> bytes:
    """Roughly `chunks` chunks of plain text (about ten sentences each)."""
    return "\n\n".join(f"Section {i}. " + " ".join([SENTENCE] * 10) for i in range(chunks)).encode()


def _started(api, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not api.app.state.runtime.ingest._active and time.monotonic() < deadline:
        time.sleep(0.02)


def _idle(api, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while api.app.state.runtime.ingest._active and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_file_is_queued_then_indexed(make_api):
    with make_api() as api:
        store = api.post("/v1/vector_stores", json={"name": "kb"}).json()["id"]
        file_id = _upload(api, "refunds.md", b"# Refunds\n\n" + SENTENCE.encode(), store)
        done = _settled(api, store, file_id)
        assert done["status"] == "completed" and done["chunks"] == 1 and done["last_error"] is None
        hits = api.post(f"/v1/vector_stores/{store}/search", json={"query": "when are refunds paid"}).json()["data"]
        assert hits and hits[0]["file_id"] == file_id
        assert api.get(f"/v1/vector_stores/{store}").json()["file_counts"] == {"in_progress": 0, "completed": 1, "failed": 0, "cancelled": 0, "total": 1}


def test_files_over_a_limit_or_unreadable_fail_with_a_last_error(make_api):
    with make_api(ingest_max_pages=100, ingest_max_characters=50_000, ingest_max_chunks=20) as api:
        store = api.post("/v1/vector_stores", json={"name": "kb"}).json()["id"]
        cases = {
            "pages.pdf": (many_pages_pdf(101), "file_too_large", "ENCLAVE_INGEST_MAX_PAGES"),
            "expands.pdf": (many_pages_pdf(90, lines_per_page=40), "file_too_large", "ENCLAVE_INGEST_MAX_CHARACTERS"),
            "long.txt": (b"x" * 50_001, "file_too_large", "ENCLAVE_INGEST_MAX_CHARACTERS"),
            "chunky.txt": (_text(30), "file_too_large", "ENCLAVE_INGEST_MAX_CHUNKS"),
            "deep.pdf": (deep_page_tree_pdf(), "invalid_file", "LimitReachedError"),
        }
        ids = {name: _upload(api, name, data, store) for name, (data, _, _) in cases.items()}
        for name, (_, code, words) in cases.items():
            row = _settled(api, store, ids[name])
            assert row["status"] == "failed" and row["last_error"]["code"] == code and words in row["last_error"]["message"], (name, row)
        # The parser still works for the next file.
        fine = _upload(api, "fine.md", b"# Fine\n\n" + SENTENCE.encode(), store)
        assert _settled(api, store, fine)["status"] == "completed"
        assert api.get("/health").status_code == 200


def test_a_file_past_its_time_limit_fails_and_the_next_one_is_indexed(make_api):
    with make_api(ingest_timeout_s=0.3, ingest_workers=1) as api:
        store = api.post("/v1/vector_stores", json={"name": "kb"}).json()["id"]
        slow = _upload(api, "big.txt", _text(400), store)
        row = _settled(api, store, slow)
        assert row["status"] == "failed" and row["last_error"]["code"] == "ingest_timeout", row
    with make_api(ingest_workers=1) as api:
        fine = _upload(api, "fine.md", b"# Fine\n\n" + SENTENCE.encode(), store)
        assert _settled(api, store, fine)["status"] == "completed"


def test_removing_a_file_while_it_is_indexed_leaves_no_chunks(make_api):
    with make_api(ingest_workers=1) as api:
        store = api.post("/v1/vector_stores", json={"name": "kb"}).json()["id"]
        file_id = _upload(api, "big.txt", _text(120), store)
        _started(api)
        time.sleep(1.0)  # some batches are in
        assert api.delete(f"/v1/vector_stores/{store}/files/{file_id}").json()["deleted"] is True
        _idle(api)
        kb = api.app.state.runtime.memory.knowledge
        left = kb.store_chunks("default", store).get(where={"file_id": file_id})["ids"]
        assert left == []
        assert api.get(f"/v1/vector_stores/{store}/files/{file_id}").status_code == 404


def test_a_file_left_in_progress_by_a_stopped_server_is_taken_up_again(make_api):
    with make_api(ingest_workers=1) as api:
        store = api.post("/v1/vector_stores", json={"name": "kb"}).json()["id"]
        file_id = _upload(api, "big.txt", _text(120), store)
        _started(api)
    # The server stopped mid-file and gave it back; restarted, it takes it up at once.
    with make_api(ingest_workers=1) as api:
        assert api.get(f"/v1/vector_stores/{store}/files/{file_id}").json()["status"] == "in_progress"
        row = _settled(api, store, file_id)
        assert row["status"] == "completed" and row["chunks"] >= 100, row
        with api.app.state.runtime.db.connect() as conn:
            assert conn.execute(vector_store_files.select()).mappings().one()["attempts"] == 2
        ids = api.app.state.runtime.memory.knowledge.store_chunks("default", store).get(where={"file_id": file_id})["ids"]
        assert len(ids) == row["chunks"]  # the first attempt's chunks were replaced, not doubled


def _left_behind(api, store: str, owner: str, attempts: int, lease_until: float) -> str:
    """A file as another server left it in the queue."""
    file_id = api.post("/v1/files", files={"file": ("a.md", b"# A\n\nText.")}, data={"purpose": "assistants"}).json()["id"]
    with api.app.state.runtime.db.begin() as conn:
        conn.execute(
            vector_store_files.insert().values(
                vector_store_id=store, file_id=file_id, tenant="default", filename="a.md", status="in_progress",
                chunks=0, created_at=time.time(), attempts=attempts, lease_owner=owner, lease_until=lease_until,
            )
        )
    api.app.state.runtime.ingest.submit()
    return file_id


def test_a_file_held_by_a_replica_that_died_is_taken_over_when_its_lease_runs_out(make_api):
    with make_api(ingest_workers=1) as api:
        store = api.post("/v1/vector_stores", json={"name": "kb"}).json()["id"]
        held = _left_behind(api, store, "ingest-other-replica", 1, time.time() + 2)
        time.sleep(1)
        assert api.get(f"/v1/vector_stores/{store}/files/{held}").json()["status"] == "in_progress"  # its lease still runs
        row = _settled(api, store, held)
        assert row["status"] == "completed", row


def test_a_file_taken_up_too_often_fails_instead_of_staying_in_progress(make_api):
    with make_api(ingest_workers=1) as api:
        store = api.post("/v1/vector_stores", json={"name": "kb"}).json()["id"]
        # As three servers that died on it would have left it: taken three times, lease run out.
        file_id = _left_behind(api, store, "ingest-dead", ingestion.MAX_ATTEMPTS, time.time() - 1)
        row = _settled(api, store, file_id)
        assert row["status"] == "failed" and "interrupted 3 times" in row["last_error"]["message"], row


def test_tenants_take_turns_for_the_workers(make_api, tmp_path):
    from server.auth import KeyStore

    keys = KeyStore(tmp_path / "keys.json")
    a, _ = keys.create("tenant-a", "u", ["knowledge"])
    b, _ = keys.create("tenant-b", "u", ["knowledge"])
    with make_api(ingest_workers=1) as api:
        def call(key, method, path, **kw):
            return api.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)

        stores = {k: call(k, "POST", "/v1/vector_stores", json={"name": "kb"}).json()["id"] for k in (a, b)}

        def add(key, name, chunks):
            fid = call(key, "POST", "/v1/files", files={"file": (name, _text(chunks))}, data={"purpose": "assistants"}).json()["id"]
            assert call(key, "POST", f"/v1/vector_stores/{stores[key]}/files", json={"file_id": fid}).json()["status"] == "in_progress"
            return fid

        first = [add(a, f"a{i}.txt", 30) for i in range(3)]
        late = add(b, "b.txt", 30)
        finished: dict[str, float] = {}
        deadline = time.monotonic() + 180
        while len(finished) < 4 and time.monotonic() < deadline:
            for key, fid in [(a, f) for f in first] + [(b, late)]:
                if fid not in finished and call(key, "GET", f"/v1/vector_stores/{stores[key]}/files/{fid}").json()["status"] == "completed":
                    finished[fid] = time.monotonic()
            time.sleep(0.05)
        assert len(finished) == 4
        # Tenant b's one file, added last, is not left behind all of tenant a's.
        assert finished[late] < finished[first[2]]


def test_the_embedding_gate_serves_interactive_callers_first_and_tenants_in_turn():
    async def scenario() -> list[str]:
        gate = EmbeddingGate()
        order: list[str] = []

        async def use(name: str, tenant: str | None) -> None:
            async with gate.hold(tenant):
                order.append(name)
                await asyncio.sleep(0.01)

        async with gate.hold("a"):  # a bulk batch is running; the others queue behind it
            tasks = [asyncio.create_task(use(n, t)) for n, t in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("chat", None), ("b2", "b")]]
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        cancelled = asyncio.create_task(use("never", "c"))
        async with gate.hold(None):
            await asyncio.sleep(0)
            cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        async with gate.hold("d"):  # the gate is free again
            order.append("d")
        return order

    assert asyncio.run(scenario()) == ["chat", "a1", "b1", "a2", "b2", "d"]
