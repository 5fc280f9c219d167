"""Indexing of vector-store files, off the request path: bounded, fair, resumable.

Adding a file to a vector store writes its `in_progress` row and returns at once (as
OpenAI's API does; clients poll). Workers take rows by lease in SQL, so any replica may
index any file: one whose server stopped is taken up again at once (a stopping server
gives its files back, a restarted one takes its own back), one whose replica died, once
its lease runs out. Each file:

1. is parsed and chunked in the parser process (server/memory/parsing.py), within its
   limits on pages, characters, chunks and time;
2. is embedded in batches as bulk work of its tenant: chat-time embeddings go first,
   other tenants' files take turns with it (server/embedder.py: EmbeddingGate), and
   while chats are going on its batches are small, use one core and take at most
   `share` of the embedder's time;
3. is indexed batch by batch while its lease is renewed every second: a file removed
   from the store (or its store deleted) stops within a second and leaves no chunks.

A file over a limit, or unreadable, ends `failed` with a `last_error` naming why; one
taken up `MAX_ATTEMPTS` times without finishing (a server that crashed on it each time)
ends `failed` too, so no file stays `in_progress` for ever.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Engine as Database

from server.db import files, vector_store_files
from server.errors import ServiceUnavailableError
from server.ids import internal_id
from server.memory.knowledge import CHUNK_TOKENS, OVERLAP_TOKENS
from server.memory.parsing import FileRefused, Limits, ParserProcess, parse_and_chunk

log = logging.getLogger(__name__)

LEASE_S = 30.0
RENEW_S = 1.0  # how often a worker renews its lease, and so how soon it sees its file removed
MAX_ATTEMPTS = 3
BATCH = 16  # chunks embedded at once when no chat is going on
CHAT_BATCH = 1  # ... and while one is: a chat's own embedding waits for one chunk (~60 ms) at most
CHAT_RECENT_S = 2.0  # a turn embedded this recently counts as a chat going on
IDLE_POLL_S = 2.0  # how often an idle worker looks for files left by other replicas


def lease_owner(host: str, port: int, data_dir: Path) -> str:
    """The name a server holds leases under: the same across restarts of one server (so
    it takes its own files back at once), different for every other replica."""
    return "ingest-" + hashlib.sha256(f"{host}|{port}|{data_dir}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    store_id: str
    file_id: str
    tenant: str
    filename: str
    attempts: int


class IngestWorker:
    def __init__(
        self,
        db: Database,
        knowledge: Any,
        embedder: Any,
        tokenizer_dir: Path,
        limits: Limits,
        timeout_s: float,
        workers: int = 2,
        share: float = 0.5,
        chats_running: Callable[[], int] = lambda: 0,
        owner: str | None = None,
        metrics: Any = None,
    ):
        self.db = db
        self.knowledge = knowledge  # KnowledgeBase: reads the bytes, writes the chunks
        self.embedder = embedder
        self.tokenizer_dir = tokenizer_dir
        self.limits = limits
        self.timeout_s = timeout_s
        self.workers = workers
        self.share = share
        self.chats_running = chats_running
        # Who holds a lease: stable across restarts of this server (same host, port and
        # data), so a restarted server takes its own files back at once instead of
        # waiting for their leases to run out; other replicas have other names.
        self.owner = owner or internal_id("ingest")
        self.parser = ParserProcess()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._active: dict[tuple[str, str], str] = {}  # (store, file) -> tenant
        self._served: dict[str, float] = {}  # tenant -> when a file of theirs was last taken
        self.metrics = metrics

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._main(), name="ingest")]

    async def _main(self) -> None:
        # Files this server held when it last stopped (or was killed) are free again
        # before any worker looks for work.
        await asyncio.to_thread(self._release_all)
        await asyncio.gather(*(self._loop() for _ in range(self.workers)))

    def submit(self) -> None:
        """A file was added: wake a worker now rather than at its next poll."""
        self._wake.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.parser.kill()
        # What was being indexed is given back, for the next server to take up at once.
        await asyncio.to_thread(self._release_all)

    def _release_all(self) -> None:
        v = vector_store_files.c
        with self.db.begin() as conn:
            conn.execute(
                update(vector_store_files).where(v.lease_owner == self.owner, v.status == "in_progress").values(lease_owner=None, lease_until=None)
            )

    async def _loop(self) -> None:
        while True:
            try:
                job = await asyncio.to_thread(self._claim, set(self._active.values()))
            except Exception:  # noqa: BLE001 - the database may be away for a moment
                log.exception("ingestion: claiming a file failed")
                job = None
            if job is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
                except TimeoutError:
                    pass
                continue
            self._active[(job.store_id, job.file_id)] = job.tenant
            try:
                await self._run(job)
            finally:
                self._active.pop((job.store_id, job.file_id), None)

    # ---------------------------------------------------------------- the queue in SQL

    def _claim(self, busy: set[str]) -> Job | None:
        """The next file to index. Tenants take turns: a tenant this server is not
        indexing for goes first, then the one served longest ago, then the oldest file."""
        now = time.time()
        v = vector_store_files.c
        free = and_(v.status == "in_progress", or_(v.lease_until.is_(None), v.lease_until < now))
        with self.db.connect() as conn:
            rows = conn.execute(
                select(v.vector_store_id, v.file_id, v.tenant, v.filename, v.attempts).where(free).order_by(v.created_at).limit(256)
            ).all()
        for row in sorted(rows, key=lambda r: (r.tenant in busy, self._served.get(r.tenant, 0.0))):
            with self.db.begin() as conn:
                taken = conn.execute(
                    update(vector_store_files)
                    .where(v.vector_store_id == row.vector_store_id, v.file_id == row.file_id, free)
                    .values(lease_owner=self.owner, lease_until=now + LEASE_S, attempts=v.attempts + 1)
                ).rowcount
            if taken == 1:
                self._served[row.tenant] = now
                return Job(row.vector_store_id, row.file_id, row.tenant, row.filename, row.attempts + 1)
        return None

    def _renew(self, job: Job) -> bool:
        """Extend the lease; False when the row is no longer this worker's."""
        v = vector_store_files.c
        with self.db.begin() as conn:
            return conn.execute(
                update(vector_store_files)
                .where(v.vector_store_id == job.store_id, v.file_id == job.file_id, v.lease_owner == self.owner, v.status == "in_progress")
                .values(lease_until=time.time() + LEASE_S)
            ).rowcount == 1

    def _finish(self, job: Job, status: str, chunks: int, error: dict[str, str] | None) -> bool:
        v = vector_store_files.c
        with self.db.begin() as conn:
            return conn.execute(
                update(vector_store_files)
                .where(v.vector_store_id == job.store_id, v.file_id == job.file_id, v.lease_owner == self.owner, v.status == "in_progress")
                .values(status=status, chunks=chunks, last_error=json.dumps(error) if error else None, lease_owner=None, lease_until=None)
            ).rowcount == 1

    def _release(self, job: Job, retry_in: float) -> None:
        v = vector_store_files.c
        with self.db.begin() as conn:
            conn.execute(
                update(vector_store_files)
                .where(v.vector_store_id == job.store_id, v.file_id == job.file_id, v.lease_owner == self.owner)
                .values(lease_owner=None, lease_until=time.time() + retry_in)
            )

    def _read(self, job: Job) -> bytes:
        with self.db.connect() as conn:
            exists = conn.execute(select(files.c.id).where(files.c.id == job.file_id, files.c.tenant == job.tenant)).first()
        if exists is None:
            raise FileRefused("file_not_found", "the file was deleted before it could be indexed")
        return self.knowledge.read_bytes(job.tenant, job.file_id)

    # ---------------------------------------------------------------- one file

    async def _run(self, job: Job) -> None:
        started = time.monotonic()
        if job.attempts > MAX_ATTEMPTS:
            await self._fail(job, "server_error", f"indexing was interrupted {job.attempts - 1} times (the server stopped while indexing it)")
            return
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(job, lost))
        try:
            chunks = await self._index(job, started, lost)
        except FileRefused as exc:
            await self._fail(job, exc.code, exc.message)
        except TimeoutError:
            await self._fail(job, "ingest_timeout", f"indexing took longer than {self.timeout_s:g} s (ENCLAVE_INGEST_TIMEOUT_S)")
        except _Superseded:
            await asyncio.to_thread(self._drop_if_gone, job)
        except ServiceUnavailableError:
            # The vector store is away for a moment: give the file back, to be retried.
            log.warning("ingestion of %s paused: the vector store is unavailable", job.file_id)
            await asyncio.to_thread(self._release, job, 10.0)
        except Exception:
            log.exception("ingestion of %s failed", job.file_id)
            await self._fail(job, "server_error", "indexing failed")
        else:
            if not await asyncio.to_thread(self._finish, job, "completed", chunks, None):
                await asyncio.to_thread(self._drop_if_gone, job)
            elif self.metrics is not None:
                self.metrics.ingested.labels(outcome="completed").inc()
                self.metrics.ingest_seconds.observe(time.monotonic() - started)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _fail(self, job: Job, code: str, message: str) -> None:
        await asyncio.to_thread(self.knowledge.delete_chunks, job.tenant, job.store_id, job.file_id)
        if await asyncio.to_thread(self._finish, job, "failed", 0, {"code": code, "message": message}) and self.metrics is not None:
            self.metrics.ingested.labels(outcome=code).inc()

    def _drop_if_gone(self, job: Job) -> None:
        """The row was removed (or replaced) while indexing: chunks written meanwhile go
        too, unless a newer row of the same file now owns them."""
        v = vector_store_files.c
        with self.db.connect() as conn:
            row = conn.execute(select(v.status).where(v.vector_store_id == job.store_id, v.file_id == job.file_id)).first()
        if row is None:
            self.knowledge.delete_chunks(job.tenant, job.store_id, job.file_id)

    def _chatting(self) -> bool:
        """Generations in the engine, or a turn's embedding moments ago (a turn embeds its
        message before the engine sees it)."""
        return time.monotonic() - self.embedder.last_interactive < CHAT_RECENT_S or self.chats_running() > 0

    async def _keep_lease(self, job: Job, lost: asyncio.Event) -> None:
        """Renew the lease while the file is indexed; `lost` once the row is no longer
        this worker's (removed from its store, replaced by a new upload, taken over)."""
        while True:
            await asyncio.sleep(RENEW_S)
            if not await asyncio.to_thread(self._renew, job):
                lost.set()
                return

    async def _index(self, job: Job, started: float, lost: asyncio.Event) -> int:
        def remaining() -> float:
            left = self.timeout_s - (time.monotonic() - started)
            if left <= 0:
                raise TimeoutError
            return left

        data = await asyncio.to_thread(self._read, job)
        texts = await self.parser.run(remaining(), parse_and_chunk, job.filename, data, self.limits, str(self.tokenizer_dir), CHUNK_TOKENS, OVERLAP_TOKENS)
        # A file taken up again starts clean: chunks of an earlier attempt go.
        await asyncio.to_thread(self.knowledge.delete_chunks, job.tenant, job.store_id, job.file_id)
        start = 0
        while start < len(texts):
            # While chats go on, small batches on one core: a chat's own embedding never
            # waits long for the encoder, and the engine keeps the other cores.
            chatting = self._chatting()
            batch = texts[start : start + (CHAT_BATCH if chatting else BATCH)]
            began = time.monotonic()
            left = remaining()
            vectors = await asyncio.wait_for(self.embedder.embed(batch, tenant=job.tenant, threads=1 if chatting else None), left)
            if lost.is_set():
                raise _Superseded
            await asyncio.to_thread(self.knowledge.write_chunks, job.tenant, job.store_id, job.file_id, job.filename, start, batch, vectors)
            start += len(batch)
            if chatting and self.share < 1:
                # ... and take at most `share` of the embedder's time.
                await asyncio.sleep(min((time.monotonic() - began) * (1 - self.share) / self.share, remaining()))
        return len(texts)


class _Superseded(Exception):
    """The row stopped being this worker's while it indexed."""
