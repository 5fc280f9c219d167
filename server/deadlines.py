"""Server-side deadlines: no request waits for ever on a stalled or overloaded engine.

Each HTTP request runs under a Deadline (DeadlineMiddleware sets it): the server's
`request_timeout_s`, or less when the client asks with the `X-Enclave-Timeout` header
(seconds; a client may shorten its deadline, never lengthen it past the server's). Every
generation's stream is read through `watched`: when the engine produces nothing at all,
for this request or any other, for `stall_timeout_s`, or the request's deadline passes,
the generation is aborted in the engine and the request fails with a 504 that says
which, instead of hanging. A busy engine is not a stalled one: a valid request queued
behind others waits, up to its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from server.errors import EnclaveError

T = TypeVar("T")

HEADER = "x-enclave-timeout"


class DeadlineExceededError(EnclaveError):
    """The request's deadline passed, or the engine stopped producing tokens (504)."""

    status_code = 504
    error_type = "server_error"
    default_code = "deadline_exceeded"


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() by which the request must be done
    stall_s: float  # longest wait for the engine's next output

    @property
    def remaining(self) -> float:
        return self.at - time.monotonic()


current: ContextVar[Deadline | None] = ContextVar("enclave_deadline", default=None)


async def watched(stream: AsyncIterator[T], abort: Callable[[], Awaitable[None]], last_output: Callable[[], float] = lambda: 0.0) -> AsyncIterator[T]:
    """`stream`, failing with DeadlineExceededError (after `abort()`) when the request's
    deadline passes, or when the engine is stalled: nothing from this stream and nothing
    from the engine at all (`last_output()`, its latest output for any request, on the
    time.monotonic() clock) for the stall limit. An engine busy with other requests is
    not stalled: a request queued behind them waits, up to its deadline. Outside a
    request (start-up warm-ups) there is no limit.

    Each item is awaited in a task of its own, so that a wait that times out while the
    engine is busy can go on waiting for the same item (about 15 µs an item)."""
    deadline = current.get()
    if deadline is None:
        async for item in stream:
            yield item
        return
    progress = time.monotonic()  # this request's latest item, or its start
    pending: asyncio.Future | None = None

    async def next_item() -> T:
        return await anext(stream)

    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(next_item())
            stall_left = max(progress, last_output()) + deadline.stall_s - time.monotonic()
            done, _ = await asyncio.wait({pending}, timeout=max(min(stall_left, deadline.remaining), 0.0))
            if done:
                finished, pending = pending, None
                try:
                    item = finished.result()
                except StopAsyncIteration:
                    return
                progress = time.monotonic()
                yield item
                continue
            if deadline.remaining <= 0:
                await _give_up(pending, abort)
                pending = None
                raise DeadlineExceededError(
                    "The request did not finish within its deadline; the generation was stopped. "
                    "Ask for fewer tokens, or a longer deadline (X-Enclave-Timeout, up to the server's request_timeout_s)."
                )
            if time.monotonic() - max(progress, last_output()) >= deadline.stall_s:
                await _give_up(pending, abort)
                pending = None
                raise DeadlineExceededError(f"The engine produced no output for {deadline.stall_s:g} s; the generation was stopped.", code="engine_stalled")
            # The engine produced output for another request meanwhile: busy, not stalled.
    finally:
        if pending is not None:  # the caller stopped early (a disconnect): stop reading too
            await _cancelled(pending)


async def _cancelled(pending: asyncio.Future) -> None:
    """Cancel the read in flight and wait for it to end, so the stream is not still
    running when its owner closes it."""
    pending.cancel()
    try:
        await pending
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - its own end no longer matters
        pass


async def _give_up(pending: asyncio.Future, abort: Callable[[], Awaitable[None]]) -> None:
    await _cancelled(pending)
    await abort()
