"""Episodic memory: what each user told the assistant, recalled in later conversations.

After a turn, the user's message (redacted) is kept as a `said` memory (questions are
not: they tell nothing about the user) and each first-person statement in it ("my dog is called Biscuit", "I live in Ghent") as a `fact`;
facts are keyed by their text, so saying the same thing twice keeps one. Before a turn,
the memories of that same user most similar to the new message are recalled. Memories
live in the tenant's `mem` collection and every read and delete filters on the user:
one user's memory never reaches another user's context.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from server.embedder import Embedder
from server.memory.chunking import split_sentences
from server.memory.vectors import VectorStore
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
    conversation_id: str

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


class EpisodicMemory:
    def __init__(self, vectors: VectorStore, embedder: Embedder | None, recall_k: int = 4):
        self.vectors = vectors
        self.embedder = embedder
        self.recall_k = recall_k

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
        # The words themselves, unless the facts already hold all of them; a bare
        # question tells nothing about the user and would only crowd out facts.
        if facts != [text] and not text.rstrip().endswith("?"):
            items.append(("mem_" + secrets.token_hex(12), text, "said"))
        for fact in facts:
            digest = hashlib.sha256(f"{user}\x00{fact.lower()}".encode()).hexdigest()[:24]
            items.append((f"mem_{digest}", fact, "fact"))
        if not items:
            return 0
        vectors = await self.embedder.embed([t for _, t, _ in items])
        now = time.time()
        metadatas: list[Any] = [
            {"user": user, "conversation_id": conversation_id, "turn_id": turn_id, "kind": kind, "created_at": now} for _, _, kind in items
        ]
        await asyncio.to_thread(
            self._collection(tenant).upsert,
            ids=[i for i, _, _ in items],
            embeddings=vectors,
            documents=[t for _, t, _ in items],
            metadatas=metadatas,
        )
        return len(items)

    async def recall(self, tenant: str, user: str, query: str, exclude_conversation: str | None = None) -> list[Memory]:
        if self.embedder is None or not query.strip():
            return []
        vector = (await self.embedder.embed([query]))[0]
        where: dict[str, Any] = {"user": user}
        if exclude_conversation:
            # What was said in this conversation is in the window (or its summary) already.
            where = {"$and": [{"user": user}, {"conversation_id": {"$ne": exclude_conversation}}]}
        found = await asyncio.to_thread(
            self._collection(tenant).query,
            query_embeddings=[vector],
            n_results=self.recall_k * 2,
            where=where,
            include=["documents", "metadatas", "distances"],
        )
        out: list[Memory] = []
        seen: set[str] = set()
        for mem_id, text, meta, distance in zip(found["ids"][0], found["documents"][0], found["metadatas"][0], found["distances"][0]):
            score = 1.0 - float(distance)
            # The user filter is in the query; checked again because a leak here is the
            # one failure this module must never have.
            if meta.get("user") != user or score < MIN_SCORE or text.lower() in seen:
                continue
            seen.add(text.lower())
            out.append(Memory(mem_id, text, str(meta.get("kind")), score, str(meta.get("conversation_id"))))
        # Facts first: they are the distilled form of what was said.
        out.sort(key=lambda m: (m.kind != "fact", -m.score))
        return out[: self.recall_k]

    def list(self, tenant: str, user: str, limit: int = 100) -> list[dict[str, Any]]:
        got = self._collection(tenant).get(where={"user": user}, include=["documents", "metadatas"])
        rows = [
            {
                "id": mem_id,
                "object": "memory",
                "user": meta.get("user"),
                "kind": meta.get("kind"),
                "text": text,
                "conversation_id": meta.get("conversation_id"),
                "created_at": int(meta.get("created_at", 0)),
            }
            for mem_id, text, meta in zip(got["ids"], got["documents"], got["metadatas"])
        ]
        rows.sort(key=lambda r: r["created_at"], reverse=True)
        return rows[:limit]

    def owner(self, tenant: str, memory_id: str) -> str | None:
        got = self._collection(tenant).get(ids=[memory_id], include=["metadatas"])
        return got["metadatas"][0].get("user") if got["ids"] else None

    def delete(self, tenant: str, memory_id: str) -> None:
        self._collection(tenant).delete(ids=[memory_id])

    def forget(self, tenant: str, user: str) -> int:
        collection = self._collection(tenant)
        count = len(collection.get(where={"user": user}, include=[])["ids"])
        collection.delete(where={"user": user})
        return count
