"""Moves vector-store chunks from a tenant's shared `kb` collection (where every store of a
tenant once lived, filtered by store id) into each store's own collection.

The vectors, texts, metadata and ids move as they are: nothing is embedded again. It runs
at start-up, before the server binds, and is safe to repeat or to interrupt: each page is
written to its store's collection (an upsert) before it is deleted from the old one, so a
crash in between leaves a chunk in both places, never in neither, and the next start
finishes the move. Replicas that start together may both move a page; the upsert makes
that harmless. Chunks of a store that no longer exists are dropped with the old collection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine as Database

from server.db import vector_stores
from server.memory.vectors import ChromaCollections

log = logging.getLogger(__name__)

LEGACY_KIND = "kb"
PAGE = 2000


def move_legacy_chunks(db: Database, vectors: ChromaCollections, store_chunks: Callable[[str, str], Any]) -> int:
    """Move every tenant's legacy chunks into their stores' collections (`store_chunks`:
    tenant, store id -> the store's collection); the number moved."""
    # chromadb loads lazily, as in vectors.py
    from chromadb.errors import NotFoundError as ChromaNotFound

    # Every start asks once per tenant; a tenant's store ids are read only when it has
    # something to move.
    with db.connect() as conn:
        tenants = conn.execute(select(vector_stores.c.tenant).distinct()).scalars().all()
    moved = 0
    for tenant in tenants:
        legacy = vectors.existing(LEGACY_KIND, tenant)
        if legacy is None:
            continue
        with db.connect() as conn:
            ids = set(conn.execute(select(vector_stores.c.id).where(vector_stores.c.tenant == tenant)).scalars())
        try:
            moved += _move_tenant(legacy, tenant, ids, store_chunks)
        except ChromaNotFound:
            continue  # another replica finished this tenant's move and dropped the collection
        vectors.drop(LEGACY_KIND, tenant)
    if moved:
        log.info("moved %d vector-store chunks into per-store collections", moved)
    return moved


def _move_tenant(legacy: Any, tenant: str, store_ids: set[str], store_chunks: Callable[[str, str], Any]) -> int:
    moved = 0
    while True:
        page = legacy.get(limit=PAGE, include=["embeddings", "documents", "metadatas"])
        if not page["ids"]:
            return moved
        by_store: dict[str, list[int]] = {}
        for i, meta in enumerate(page["metadatas"]):
            store_id = (meta or {}).get("vector_store_id")
            if store_id in store_ids:
                by_store.setdefault(store_id, []).append(i)
        for store_id, rows in by_store.items():
            store_chunks(tenant, store_id).upsert(
                ids=[page["ids"][i] for i in rows],
                embeddings=[page["embeddings"][i] for i in rows],
                documents=[page["documents"][i] for i in rows],
                metadatas=[page["metadatas"][i] for i in rows],
            )
            moved += len(rows)
        legacy.delete(ids=page["ids"])
