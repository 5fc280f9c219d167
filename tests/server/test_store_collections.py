"""Each vector store's chunks in a collection of its own: search across stores, deletion,
and the move of stores made when a tenant's stores shared one collection (no re-embedding).
Over the ScriptedEngine with the real embedder, SQLite and Chroma on disk."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.memory.store_migration import LEGACY_KIND

DOCS = {
    "refunds.md": b"# Refunds\n\nRefunds of damaged items are paid within five business days of the return.",
    "shipping.md": b"# Shipping\n\nParcels to the islands travel by ferry and take nine days.",
}


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


@pytest.fixture
def make_api(tmp_path, embedder):
    """A server over one data directory; a second call is the same server restarted."""

    def make():
        app = create_app(load_settings(data_dir=tmp_path), engine=ScriptedEngine(served_model="scripted", max_model_len=512), embedder=embedder)
        return TestClient(app)

    return make


def _store_with(api, name: str) -> tuple[str, str]:
    store = api.post("/v1/vector_stores", json={"name": name}).json()["id"]
    file_id = api.post("/v1/files", files={"file": (name, DOCS[name])}, data={"purpose": "assistants"}).json()["id"]
    api.post(f"/v1/vector_stores/{store}/files", json={"file_id": file_id})
    deadline = time.monotonic() + 60
    while api.get(f"/v1/vector_stores/{store}/files/{file_id}").json()["status"] == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return store, file_id


def _search(api, store: str, query: str) -> list[tuple[str, float]]:
    found = api.post(f"/v1/vector_stores/{store}/search", json={"query": query}).json()["data"]
    return [(hit["filename"], round(hit["score"], 5)) for hit in found]


def test_each_store_has_its_own_collection_and_loses_it_with_the_store(make_api):
    with make_api() as api:
        kb = api.app.state.runtime.memory.knowledge
        refunds, refunds_file = _store_with(api, "refunds.md")
        shipping, _ = _store_with(api, "shipping.md")
        assert kb.store_chunks("default", refunds).count() >= 1 and kb.store_chunks("default", shipping).count() >= 1
        assert [name for name, _ in _search(api, refunds, "How long do parcels take?")] == ["refunds.md"]
        # A file in two stores: deleting it removes its chunks from both.
        api.post(f"/v1/vector_stores/{shipping}/files", json={"file_id": refunds_file})
        deadline = time.monotonic() + 60
        while api.get(f"/v1/vector_stores/{shipping}/files/{refunds_file}").json()["status"] == "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert kb.store_chunks("default", shipping).get(where={"file_id": refunds_file})["ids"]
        assert api.delete(f"/v1/files/{refunds_file}").json()["deleted"] is True
        for store in (refunds, shipping):
            assert kb.store_chunks("default", store).get(where={"file_id": refunds_file})["ids"] == []
        assert api.delete(f"/v1/vector_stores/{shipping}").json()["deleted"] is True
        assert kb.vectors.existing("vs", "default", shipping) is None


def test_stores_of_the_shared_layout_are_moved_on_start_without_embedding_again(make_api):
    with make_api() as api:
        kb = api.app.state.runtime.memory.knowledge
        refunds, _ = _store_with(api, "refunds.md")
        shipping, _ = _store_with(api, "shipping.md")
        before = {store: _search(api, store, "When is my refund paid?") for store in (refunds, shipping)}
        # Put the server's data back as it was before per-store collections: every chunk in
        # the tenant's shared collection, plus one of a store deleted since.
        legacy = kb.vectors.collection(LEGACY_KIND, "default")
        moved = {}
        for store in (refunds, shipping):
            got = kb.store_chunks("default", store).get(include=["embeddings", "documents", "metadatas"])
            legacy.add(ids=got["ids"], embeddings=got["embeddings"], documents=got["documents"], metadatas=got["metadatas"])
            moved[store] = dict(zip(got["ids"], np.asarray(got["embeddings"]), strict=True))
            kb.vectors.drop("vs", "default", store)
        legacy.add(ids=["gone:x:0"], embeddings=[np.ones(384) / np.sqrt(384)], documents=["orphan"], metadatas=[{"vector_store_id": "vs_gone", "file_id": "x"}])
    with make_api() as api:
        kb = api.app.state.runtime.memory.knowledge
        assert kb.vectors.existing(LEGACY_KIND, "default") is None
        for store, chunks in moved.items():
            got = kb.store_chunks("default", store).get(include=["embeddings"])
            assert set(got["ids"]) == set(chunks)
            for chunk_id, vector in zip(got["ids"], got["embeddings"], strict=True):
                assert np.array_equal(np.asarray(vector), chunks[chunk_id])  # the same vectors, not new ones
            assert _search(api, store, "When is my refund paid?") == before[store]
