"""Episodic memory: what each user told the assistant, recalled in later conversations.

After a turn, the user's message (redacted) is kept as a `said` memory (questions are
not: they tell nothing about the user) and each first-person statement in it ("my dog
is called Biscuit", "I live in Ghent") as a `fact`; facts are keyed by their text, so
saying the same thing twice keeps one. Before a turn, the memories of that same user
most similar to the new message are recalled.

The text is in SQL; Chroma's tenant `mem` collection holds only vectors tagged with a
hash of the owner. Every recall filters on that owner in Chroma and again in SQL: one
user's memory never reaches another user's context, and forgetting a user leaves no
readable trace of them in the vector files.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine as Database

from server.db import memories
from server.embedder import Embedder
from server.handles import Late
from server.ids import new_id
from server.memory.chunking import split_sentences
from server.memory.vectors import ChromaCollections
from server.telemetry.redaction import redact_text

# A statement about the speaker: worth remembering across conversations.
_FIRST_PERSON = re.compile(
    r"\b(my|i am|i'm|i was|i live|i work|i have|i've|i had|i prefer|i like|i love|i hate|i need|i use|i own|call me|i moved)\b",
    re.IGNORECASE,
)
_MAX_CHARS = 600
# Cosine similarity below this is noise for all-MiniLM-L6-v2.
MIN_SCORE = 0.3


@dataclass
class Memory:
    id: str
    text: str
    kind: str
    score: float

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "kind": self.kind, "score": round(self.score, 4)}


def extract_facts(text: str) -> list[str]:
    facts = []
    for sentence in split_sentences(" ".join(text.split())):
        if sentence.endswith("?") or not _FIRST_PERSON.search(sentence):
            continue
        if 3 <= len(sentence.split()) <= 60:
            facts.append(sentence)
    return facts


def owner_tag(tenant: str, user: str) -> str:
    return hashlib.sha256(f"{tenant}\x00{user}".encode()).hexdigest()[:32]


def _public(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "memory",
        "user": row["user"],
        "kind": row["kind"],
        "text": row["text"],
        "conversation_id": row["conversation_id"],
        "created_at": int(row["created_at"]),
    }


class EpisodicMemory:
    def __init__(self, db: Database, vectors: ChromaCollections, embedder: Embedder | Late[Embedder] | None, recall_k: int = 4):
        self.db = db
        self.vectors = vectors
        self._embedder = Late.of(embedder)
        self.recall_k = recall_k

    @property
    def embedder(self) -> Embedder | None:
        return self._embedder.value  # None until it has loaded

    def _collection(self, tenant: str) -> Any:
        return self.vectors.collection("mem", tenant)

    async def remember(self, tenant: str, user: str, conversation_id: str, turn_id: str, text: str) -> int:
        """Write the memories of one user message; returns how many were written."""
        if self.embedder is None:
            return 0
        text = redact_text(" ".join(text.split()))[:_MAX_CHARS]
        if len(text.split()) < 3:
            return 0  # "yes", "thanks": nothing to remember
        facts = extract_facts(text)
        items: list[tuple[str, str, str]] = []
        # The words themselves, unless the facts already hold all of them.
        if facts != [text] and not text.rstrip().endswith("?"):
            items.append((new_id("memory"), text, "said"))
        for fact in facts:
            digest = hashlib.sha256(f"{tenant}\x00{user}\x00{fact.lower()}".encode()).hexdigest()[:24]
            items.append((f"mem_{digest}", fact, "fact"))
        if not items:
            return 0
        vectors = await self.embedder.embed([t for _, t, _ in items])
        now = time.time()
        await asyncio.to_thread(self._write_rows, tenant, user, conversation_id, turn_id, items, now)
        metadatas: list[Any] = [{"owner": owner_tag(tenant, user), "conversation_id": conversation_id, "kind": kind} for _, _, kind in items]
        await asyncio.to_thread(self._collection(tenant).upsert, ids=[i for i, _, _ in items], embeddings=vectors, metadatas=metadatas)
        return len(items)

    def _write_rows(self, tenant: str, user: str, conversation_id: str, turn_id: str, items: list[tuple[str, str, str]], now: float) -> None:
        with self.db.begin() as conn:
            for mem_id, text, kind in items:
                values = {"id": mem_id, "tenant": tenant, "user": user, "conversation_id": conversation_id, "turn_id": turn_id, "kind": kind, "text": text, "created_at": now}
                if self.db.dialect.name == "sqlite":
                    conn.execute(sqlite_insert(memories).values(**values).on_conflict_do_nothing())
                elif conn.execute(select(memories.c.id).where(memories.c.id == mem_id)).first() is None:
                    conn.execute(memories.insert().values(**values))

    async def recall(self, tenant: str, user: str, query: str, exclude_conversation: str | None = None) -> list[Memory]:
        if self.embedder is None or not query.strip() or self.recall_k == 0:
            return []
        vector = await self.embedder.embed_one(query)
        owner = owner_tag(tenant, user)
        where: dict[str, Any] = {"owner": owner}
        if exclude_conversation:
            # What was said in this conversation is in the window (or its summary) already.
            where = {"$and": [{"owner": owner}, {"conversation_id": {"$ne": exclude_conversation}}]}
        found = await asyncio.to_thread(
            self._collection(tenant).query, query_embeddings=[vector], n_results=self.recall_k * 2, where=where, include=["distances"]
        )
        scores = {i: 1.0 - float(d) for i, d in zip(found["ids"][0], found["distances"][0]) if 1.0 - float(d) >= MIN_SCORE}
        if not scores:
            return []
        rows = await asyncio.to_thread(self._rows, tenant, user, list(scores))
        out, seen = [], set()
        for row in rows:
            if row["text"].lower() in seen:
                continue
            seen.add(row["text"].lower())
            out.append(Memory(row["id"], row["text"], row["kind"], scores[row["id"]]))
        # Facts first: they are the distilled form of what was said.
        out.sort(key=lambda m: (m.kind != "fact", -m.score))
        return out[: self.recall_k]

    def _rows(self, tenant: str, user: str, ids: list[str]) -> list[Any]:
        # The owner is checked again here: a leak is the one failure this module must never have.
        with self.db.connect() as conn:
            return conn.execute(
                select(memories).where(memories.c.id.in_(ids), memories.c.tenant == tenant, memories.c.user == user)
            ).mappings().all()

    def list(self, tenant: str, user: str, limit: int = 100) -> list[dict[str, Any]]:
        with self.db.connect() as conn:
            rows = conn.execute(
                select(memories).where(memories.c.tenant == tenant, memories.c.user == user).order_by(memories.c.created_at.desc()).limit(limit)
            ).mappings().all()
        return [_public(r) for r in rows]

    def owner(self, tenant: str, memory_id: str) -> str | None:
        with self.db.connect() as conn:
            return conn.execute(select(memories.c.user).where(memories.c.id == memory_id, memories.c.tenant == tenant)).scalar()

    def delete(self, tenant: str, memory_id: str) -> None:
        self._collection(tenant).delete(ids=[memory_id])
        with self.db.begin() as conn:
            conn.execute(delete(memories).where(memories.c.id == memory_id, memories.c.tenant == tenant))

    def forget(self, tenant: str, user: str) -> int:
        self._collection(tenant).delete(where={"owner": owner_tag(tenant, user)})
        with self.db.begin() as conn:
            return conn.execute(delete(memories).where(memories.c.tenant == tenant, memories.c.user == user)).rowcount or 0
