"""The response cache: answers kept so that a question asked again is answered from SQL
and Chroma instead of the model.

An entry is found two ways. Exactly: the same model, generation parameters, context and
question (`exact_key`). Semantically: the same context (`context_key`: everything the
model read except the question) and a question whose embedding is at least `similarity`
close to the one that was answered (a Chroma collection per tenant holds those vectors,
with the entry's context key and owner as metadata).

Scope: an entry belongs to its tenant; when the answer drew on one user's memory,
conversation or personal data it also names that user, and only that user's turns find
it. Both keys include the digests of the vector stores the answer's sources came from
(knowledge.fingerprints), so a source added, removed or re-indexed makes every answer
that used the store a miss; expired entries are deleted as new ones are written.

Everything is in the database and Chroma, so every replica shares one cache. The turn's
side (when it applies, the lookup before generation, storing after) is the cache stage,
server/turn/cache_stage.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import and_, delete, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database

from server.config import ResponseCacheConfig
from server.db import response_cache
from server.handles import Late
from server.ids import new_id
from server.memory.episodic import owner_tag
from server.memory.vectors import ChromaCollections

KIND = "rc"  # the Chroma collections' kind (vectors.collection_name)
SHARED = "-"  # the owner tag of an entry every user of the tenant may be answered from


@dataclass(frozen=True)
class CacheKey:
    tenant: str
    user: str | None  # None: shared by the tenant's users
    model: str
    exact: str
    context: str
    question: str

    @classmethod
    def of(cls, tenant: str, user: str | None, model: str, params: dict[str, Any], context: Any, question: str) -> CacheKey:
        """Keys from what decides the answer: `params` (generation parameters) and
        `context` (JSON-able: the messages but the question, store digests, ...)."""
        ctx = digest({"model": model, "params": params, "context": context})
        return cls(tenant, user, model, digest({"context": ctx, "question": question}), ctx, question)

    @property
    def owner(self) -> str:
        return SHARED if self.user is None else owner_tag(self.tenant, self.user)


@dataclass
class CacheHit:
    entry_id: str
    kind: Literal["exact", "semantic"]
    answer: str
    finish_reason: str
    created_at: float
    similarity: float = 1.0

    def public(self) -> dict[str, Any]:
        """The response's `cache` extension field."""
        return {"status": "hit", "kind": self.kind, "id": self.entry_id, "similarity": round(self.similarity, 4), "cached_at": int(self.created_at)}


class ResponseCache:
    def __init__(self, db: Database, vectors: ChromaCollections, embedder: Any, config: ResponseCacheConfig):
        self.db = db
        self.vectors = vectors
        self._embedder = Late.of(embedder)
        self.config = config

    @property
    def semantic(self) -> bool:
        return self.config.similarity < 1.0

    async def lookup(self, key: CacheKey) -> CacheHit | None:
        now = time.time()
        embedder = self._embedder.value
        # The question's vector is started alongside the exact lookup, not after it: a
        # miss there needs it at once (and the input rails embed the same text meanwhile).
        vector = asyncio.ensure_future(embedder.embed_one(key.question)) if self.semantic and key.question.strip() and embedder is not None else None
        try:
            hit = await asyncio.to_thread(self._exact, key, now)
            if hit is None and vector is not None:
                hit = await asyncio.to_thread(self._nearest, key, await vector, now)
        finally:
            if vector is not None and not vector.done():
                vector.add_done_callback(_unread)  # an exact hit (or a failure) leaves it unread
        return hit

    def _owned(self, key: CacheKey) -> Any:
        c = response_cache.c
        return and_(c.tenant == key.tenant, c.user.is_(None) if key.user is None else c.user == key.user)

    def _exact(self, key: CacheKey, now: float) -> CacheHit | None:
        c = response_cache.c
        with self.db.connect() as conn:
            row = conn.execute(
                select(c.id, c.answer, c.finish_reason, c.created_at)
                .where(self._owned(key), c.exact_key == key.exact, c.expires_at > now)
                .order_by(c.created_at.desc())
                .limit(1)
            ).first()
        return CacheHit(row.id, "exact", row.answer, row.finish_reason, row.created_at) if row is not None else None

    def _nearest(self, key: CacheKey, vector: Any, now: float) -> CacheHit | None:
        collection = self.vectors.existing(KIND, key.tenant)
        if collection is None:
            return None
        # Filtered in Chroma, not after: the same question asked in many contexts (each
        # user's own, each system prompt) would crowd a plain nearest query.
        found = collection.query(
            query_embeddings=[vector],
            n_results=4,
            where={"$and": [{"context": key.context}, {"owner": key.owner}]},
            include=["distances"],
        )
        close = [(i, 1.0 - float(d)) for i, d in zip(found["ids"][0], found["distances"][0], strict=True) if 1.0 - float(d) >= self.config.similarity]
        if not close:
            return None
        c = response_cache.c
        with self.db.connect() as conn:
            rows = {
                r.id: r
                for r in conn.execute(
                    select(c.id, c.answer, c.finish_reason, c.created_at).where(self._owned(key), c.id.in_([i for i, _ in close]), c.expires_at > now)
                )
            }
        # Nearest first; a vector whose row expired (or is not written yet) is no hit.
        entry_id, similarity = next(((i, s) for i, s in close if i in rows), (None, 0.0))
        if entry_id is None:
            return None
        row = rows[entry_id]
        return CacheHit(entry_id, "semantic", row.answer, row.finish_reason, row.created_at, similarity)

    async def store(self, key: CacheKey, answer: str, finish_reason: str) -> str:
        vector = None
        if self.semantic and key.question.strip() and self._embedder.value is not None:
            vector = await self._embedder.value.embed_one(key.question)  # the lookup's, from the embedder's recent texts
        return await asyncio.to_thread(self._store, key, answer, finish_reason, vector)

    def _store(self, key: CacheKey, answer: str, finish_reason: str, vector: Any) -> str:
        now = time.time()
        entry_id = new_id("cached_response")
        c = response_cache.c
        with self.db.begin() as conn:
            expired = conn.execute(select(c.id).where(c.tenant == key.tenant, c.expires_at <= now)).scalars().all()
            if expired:
                conn.execute(delete(response_cache).where(c.id.in_(expired)))
            conn.execute(
                insert(response_cache).values(
                    id=entry_id,
                    tenant=key.tenant,
                    user=key.user,
                    model=key.model,
                    exact_key=key.exact,
                    context_key=key.context,
                    answer=answer,
                    finish_reason=finish_reason,
                    created_at=now,
                    expires_at=now + self.config.ttl_s,
                )
            )
        # Vectors after the row: a vector whose row is not there yet (or was expired) is
        # never a hit, since a hit needs both.
        collection = self.vectors.collection(KIND, key.tenant) if vector is not None or expired else None
        if expired:
            collection.delete(ids=list(expired))
        if vector is not None:
            collection.add(ids=[entry_id], embeddings=[vector.tolist()], metadatas=[{"context": key.context, "owner": key.owner}])
        return entry_id

    def forget_vectors(self, tenant: str, user: str) -> None:
        """The vectors of a user's personal entries (their rows go with the user's other
        rows, in `forget`)."""
        collection = self.vectors.existing(KIND, tenant)
        if collection is not None:
            collection.delete(where={"owner": owner_tag(tenant, user)})

    @staticmethod
    def forget(conn: Connection, tenant: str, user: str) -> dict[str, int]:
        c = response_cache.c
        n = conn.execute(delete(response_cache).where(c.tenant == tenant, c.user == user)).rowcount or 0
        return {"response_cache": n}


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _unread(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failed encode nobody awaited is not logged as lost
