"""Forgetting a user: every store that keeps rows naming them forgets its own, in one
transaction (all or nothing), then the database's free pages are overwritten.

The stores (each the one owner of its tables): conversations and turns, the tool audit,
pending actions, the guard audit, traces, usage (kept for spend, anonymised), the
response cache's personal answers, workflow runs and batches. The user's episodic
memories live in SQL and Chroma and are forgotten by EpisodicMemory; the cache's vectors
by ResponseCache.
`Forgetter` is what the API calls: memories, then the rest, then their counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database

from server.batches.store import BatchStore
from server.db import purge_wal
from server.guard import GuardAudit
from server.memory.conversations import ConversationStore
from server.memory.episodic import EpisodicMemory
from server.memory.response_cache import ResponseCache
from server.telemetry.cost import UsageLedger
from server.telemetry.tracing import TraceStore
from server.toolcalls.audit import ToolAudit
from server.toolcalls.executor import Executor
from server.workflows.store import WorkflowStore

Forget = Callable[[Connection, str, str], dict[str, int]]

# In the order their counts are reported.
STORES: tuple[Forget, ...] = (
    ConversationStore.forget,
    ToolAudit.forget,
    Executor.forget,
    GuardAudit.forget,
    TraceStore.forget,
    UsageLedger.forget,
    ResponseCache.forget,
    WorkflowStore.forget,
    BatchStore.forget,
)


def forget_user(db: Database, tenant: str, user: str) -> dict[str, int]:
    """Rows deleted, by table."""
    counts: dict[str, int] = {}
    with db.begin() as conn:
        for forget in STORES:
            counts.update(forget(conn, tenant, user))
    purge_wal(db)
    return counts


class Forgetter:
    def __init__(self, db: Database, episodic: EpisodicMemory, tracing: Any = None, cache: ResponseCache | None = None):
        self.db = db
        self.episodic = episodic
        self.tracing = tracing  # telemetry.tracing.Tracing: its batched spans go first
        self.cache = cache  # its vectors of the user's personal answers

    async def forget(self, tenant: str, user: str) -> dict[str, int]:
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.flush)  # spans still batched must be deleted too
        memories = await asyncio.to_thread(self.episodic.forget, tenant, user)
        if self.cache is not None:
            await asyncio.to_thread(self.cache.forget_vectors, tenant, user)
        rows = await asyncio.to_thread(forget_user, self.db, tenant, user)
        return {"memories": memories, **rows}
