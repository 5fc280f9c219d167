"""The one SSE skeleton both APIs stream through.

An encoder says what opens the stream, what each event becomes, what closes it and what
a failure after the headers were sent looks like; the skeleton runs the turn's events
through it and closes the turn (stopping generation, settling) however the stream ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from server.errors import EnclaveError
from server.turn.events import TurnEvent
from server.turn.pipeline import TurnRun


class StreamEncoder(Protocol):
    trailer: str | None  # sent after everything, even after a failure ("data: [DONE]")

    def opening(self) -> Iterable[str]: ...

    def frames(self, ev: TurnEvent) -> Iterable[str]: ...

    def closing(self) -> Iterable[str]: ...

    def failed(self, exc: EnclaveError) -> Iterable[str]: ...


def data(body: Any) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse(run: TurnRun, first: TurnEvent | None, encoder: StreamEncoder) -> AsyncIterator[str]:
    try:
        for frame in encoder.opening():
            yield frame
        ev = first
        while ev is not None:
            for frame in encoder.frames(ev):
                yield frame
            ev = await anext(run.events, None)
        # The events are exhausted, so the turn is settled: closing frames may carry its cost.
        for frame in encoder.closing():
            yield frame
    except EnclaveError as exc:
        # Headers are gone; OpenAI clients raise on an error event in the stream.
        for frame in encoder.failed(exc):
            yield frame
    finally:
        await run.aclose()
    if encoder.trailer is not None:
        yield encoder.trailer
