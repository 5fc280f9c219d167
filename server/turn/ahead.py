"""A stream of turn events whose first event is asked for before anyone reads it, so that
the work behind it (the engine's prefill) starts while the reader still waits on
something else (the input rails' verdict, the request's harmful-intent score)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.turn.events import TurnEvent
from server.turn.state import Progress


class Ahead:
    def __init__(self, stream: AsyncIterator[TurnEvent]):
        self.stream = stream
        self.first = asyncio.ensure_future(anext(stream, None))
        self._started = False

    def __aiter__(self) -> Ahead:
        return self

    async def __anext__(self) -> TurnEvent:
        if self._started:
            ev = await anext(self.stream, None)
        else:
            self._started = True
            ev = await self.first
        if ev is None:
            raise StopAsyncIteration
        return ev

    async def aclose(self) -> None:
        """Stop it, read or not: its generation is aborted and nothing more comes."""
        self.first.cancel()
        await asyncio.gather(self.first, return_exceptions=True)
        await self.stream.aclose()  # type: ignore[attr-defined]

    async def supersede(self, progress: Progress) -> None:
        """Stop it because another generation takes its place (counted so, not as a
        client that left)."""
        progress.superseding = True
        try:
            await self.aclose()
        finally:
            progress.superseding = False
