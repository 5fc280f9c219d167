"""The output guard: text through the output rails in checked windows, per choice.

How text is buffered before a check is the window's business (`guard.OutputWindow`, a
buffering strategy in the manner of NeMo's `BufferStrategy`): pass another factory to
change it. A blocked window ends its choice with the refusal and finish_reason
"content_filter"; generation stops once every choice is done.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from server.guard import Guard, OutputWindow
from server.turn.events import Kind, TurnEvent
from server.turn.state import Turn

WindowFactory = Callable[[str], OutputWindow]


class OutputGuard:
    def __init__(self, guard: Guard, window: WindowFactory | None = None):
        self.guard = guard
        self.window = window or guard.output_window

    async def events(self, turn: Turn, events: AsyncIterator[TurnEvent]) -> AsyncIterator[TurnEvent]:
        # What a leak would reveal: the instructions. A stateful turn's system message also
        # holds its sources and the user's own memories, which an answer is meant to quote.
        if turn.context is not None:
            system = turn.context.instructions
        else:
            system = next((m["content"] for m in turn.step.messages if m["role"] == "system"), "")
        windows: dict[int, OutputWindow] = {}

        def stopped(i: int) -> bool:
            return i in windows and windows[i].blocked

        try:
            async for ev in events:
                i = ev.index
                if stopped(i):
                    continue
                if ev.kind is Kind.TEXT:
                    w = windows.setdefault(i, self.window(system))
                    w.add(ev.text, ev.logprobs)
                    if w.due():
                        async for out in _release(turn, windows.get(i), i, final=False):
                            yield out
                else:
                    # A tool call or the finish: the text before it is complete.
                    async for out in _release(turn, windows.get(i), i, final=True):
                        yield out
                    if not stopped(i):
                        yield ev
                if sum(w.blocked for w in windows.values()) == turn.step.params.n:
                    break
        finally:
            await events.aclose()  # type: ignore[attr-defined]


async def _release(turn: Turn, w: OutputWindow | None, i: int, final: bool) -> AsyncIterator[TurnEvent]:
    if w is None:
        return
    text, logprobs = await w.release(final)
    if w.blocked:
        assert w.verdict is not None
        turn.guards.add(w.events)
        w.events = []
        yield TurnEvent(Kind.TEXT, i, ("\n\n" if w.released else "") + w.verdict.text)
        yield TurnEvent.finish(i, "content_filter")
    elif text or logprobs:
        turn.guards.add(w.events)
        w.events = []
        yield TurnEvent(Kind.TEXT, i, text, logprobs)
