"""The batch worker: runs batches' lines at low priority, resumably.

It takes one batch at a time by lease (server/batches/store.py), reads its input file
into lines once (or fails it, naming the bad lines), then sends each line to this same
server in-process, as the batch's creator: through the app's whole stack (middleware,
scopes, rails, budget, turn ledger), so a line is answered, traced and costed exactly as
the same request sent alone, and a line whose body is wrong gets the same 4xx. Only the
network is skipped; the creator's key is looked up as it is now, so a revoked key's
batch stops.

Interactive requests come first (server/batches/priority.py): no line starts while one
is in flight. Batches take turns: after `TURN_LINES` lines a batch goes behind any other
that waits. A line answered 503 (the engine restarting, the model loading) is not a
result: it runs again once the server serves. Each result is written as the line ends,
so a server stopped mid-batch, or killed, goes on from the first line not done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from server import in_process
from server.auth import KeyStore, Principal
from server.batches.lines import read_lines
from server.batches.priority import InteractiveTraffic
from server.batches.store import Batch, BatchStore, Result

log = logging.getLogger(__name__)

RENEW_S = 2.0  # how often the lease is renewed (and a cancel seen while lines wait)
IDLE_POLL_S = 2.0  # how often an idle worker looks for batches (other replicas' included)
GATE_POLL_S = 0.05  # how often a held-back line looks again at interactive traffic
RETRY_S = 2.0  # a line answered 503 runs again after this
# Lines a batch runs before it gives its turn to another waiting batch: one tenant's
# large batch does not hold another's small one back for hours.
TURN_LINES = 32


class BatchWorker:
    def __init__(
        self,
        store: BatchStore,
        app: Any,
        keys: KeyStore,
        traffic: InteractiveTraffic,
        concurrency: int,
        ready: Callable[[], bool],
        owner: str,
    ):
        self.store = store
        self.app = app
        self.keys = keys
        self.traffic = traffic
        self.concurrency = concurrency
        self.ready = ready
        self.owner = owner
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._main(), name="batches")

    def submit(self) -> None:
        """A batch was created or cancelled: look now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self.store.release, self.owner)

    async def _main(self) -> None:
        while True:
            try:
                batch = await asyncio.to_thread(self.store.claim, self.owner) if self.ready() else None
                if batch is not None:
                    await self._work(batch)
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad batch (or a database hiccup) must not stop the worker
                log.exception("batch worker: an error; going on")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)

    async def _work(self, batch: Batch) -> None:
        status = batch.status
        if status == "validating":
            status = await self._validate(batch)
        if status in ("in_progress", "cancelling", "finalizing"):
            await self._run(batch)

    async def _validate(self, batch: Batch) -> str:
        data = await asyncio.to_thread(self.store.input_bytes, batch)
        if data is None:
            error = {"code": "file_not_found", "message": f"The input file {batch.input_file_id} was deleted.", "param": "input_file_id", "line": None}
            await asyncio.to_thread(self.store.fail, batch, [error])
            return "failed"
        lines, errors = await asyncio.to_thread(read_lines, data, batch.endpoint, self._max_lines())
        if errors:
            await asyncio.to_thread(self.store.fail, batch, errors)
            return "failed"
        started = await asyncio.to_thread(self.store.start, batch, lines)
        return "in_progress" if started else (await asyncio.to_thread(self.store.status, batch.id) or "failed")

    def _max_lines(self) -> int:
        return self.app.state.settings.batch_max_lines

    async def _run(self, batch: Batch) -> None:
        """Run the batch's lines until none is left, it is cancelled or it expires, then
        write its files. Lines already running always finish and are recorded."""
        running: set[asyncio.Task] = set()
        after = 0  # the last line started
        started = 0  # lines started in this turn
        status: str | None = await asyncio.to_thread(self.store.status, batch.id)
        renewed = time.monotonic()
        async with in_process.client(self.app, self._creator(batch)) as client:
            try:
                while True:
                    if time.monotonic() - renewed >= RENEW_S:
                        status, renewed = await asyncio.to_thread(self.store.renew, batch.id, self.owner), time.monotonic()
                        if status is None:  # another worker holds it now
                            return
                    ending = self._ending(batch, status)
                    if ending is not None:  # no line starts; those running finish first
                        if running:
                            await asyncio.wait(running, timeout=RENEW_S)
                            continue
                        code, message, final = ending
                        await asyncio.to_thread(self.store.close_unrun, batch.id, code, message)
                        await asyncio.to_thread(self.store.finish, batch, final)
                        return
                    if started >= TURN_LINES and await asyncio.to_thread(self.store.others_waiting, batch.id):
                        if running:  # the turn ends when its lines are recorded
                            await asyncio.wait(running, timeout=RENEW_S)
                            continue
                        await asyncio.to_thread(self.store.yield_turn, batch.id, self.owner)
                        return
                    free = self.traffic.lines_allowed(self.concurrency) - len(running)
                    if free <= 0 or not self.ready():
                        await self._pause(running)
                        continue
                    status = await asyncio.to_thread(self.store.status, batch.id)
                    if status == "cancelling":  # seen before another line starts
                        continue
                    lines = await asyncio.to_thread(self.store.pending, batch.id, after, free)
                    if not lines:
                        if running:
                            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED, timeout=RENEW_S)
                            continue
                        left = await asyncio.to_thread(self.store.pending, batch.id, 0, 1)
                        if left:  # a line answered 503 that waits to run again
                            after = left[0][0] - 1
                            await asyncio.sleep(RETRY_S)
                            continue
                        await asyncio.to_thread(self.store.finish, batch, "completed")
                        return
                    for number, body in lines:
                        after, started = number, started + 1
                        task = asyncio.create_task(self._line(client, batch, number, body))
                        running.add(task)
                        task.add_done_callback(running.discard)
            finally:
                # Stopping (the server shuts down): what runs is abandoned unrecorded and
                # runs again when the batch is taken up next.
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

    def _ending(self, batch: Batch, status: str | None) -> tuple[str, str, str] | None:
        """Why no more line of the batch may run, if so: the error its unrun lines get,
        and the status it ends with."""
        if status == "cancelling":
            return "batch_cancelled", "The batch was cancelled before this request ran.", "cancelled"
        if time.time() >= batch.expires_at:
            return "batch_expired", "This request could not be executed before the completion window expired.", "expired"
        if self.keys.principal_for(batch.key_id) is None:
            return "key_revoked", "The API key that created this batch was revoked.", "completed"
        return None

    async def _pause(self, running: set[asyncio.Task]) -> None:
        if running:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED, timeout=GATE_POLL_S)
        else:
            await asyncio.sleep(GATE_POLL_S)

    def _creator(self, batch: Batch) -> Callable[[], in_process.Caller]:
        def caller() -> in_process.Caller:
            principal = self.keys.principal_for(batch.key_id)
            if principal is None:  # revoked between lines: refused as the key would be
                principal = Principal(tenant=batch.tenant, user=batch.user, scopes=())
            return in_process.Caller(principal, "batch")

        return caller

    async def _line(self, client: httpx.AsyncClient, batch: Batch, number: int, body: dict[str, Any]) -> None:
        if body.get("stream"):
            result = Result(400, _error_body("stream is not supported in a batch: each line's answer is written whole to the output file.", "stream", "unsupported_parameter"))
        else:
            try:
                response = await client.post(batch.endpoint, json=body)
            except Exception as exc:  # the app answers every request; this is a bug, recorded as a 500
                log.exception("batch %s line %d: the request failed", batch.id, number)
                result = Result(500, _error_body(f"The server had an error while processing this request ({type(exc).__name__}).", None, "server_error"))
            else:
                if response.status_code == 503:
                    return  # not a result: runs again when the server serves
                try:
                    payload = response.json()
                except ValueError:
                    payload = {"error": {"message": response.text[:500], "type": "server_error", "param": None, "code": None}}
                result = Result(response.status_code, payload, response.headers.get("x-request-id"))
        await asyncio.to_thread(self.store.record, batch.id, number, result)


def _error_body(message: str, param: str | None, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error" if code != "server_error" else "server_error", "param": param, "code": code}}
