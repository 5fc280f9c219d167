"""The one event type a turn produces, and the accumulators that fold events into answers.

Every stage downstream of generation speaks `TurnEvent`: text (with its logprobs), a
tool call's start, its argument fragments, and one finish per choice. The encoders (chat
completions, Responses) and the stored turn read the same stream through `Choices`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from server.engine.base import TokenLogprob
from server.toolcalls.format import call_text


class Kind(StrEnum):
    TEXT = "text"
    CALL = "call"  # a tool call starts: call_id and name
    ARGS = "args"  # a fragment of the arguments of call `call`
    FINISH = "finish"  # the choice ends; text is the finish reason


@dataclass
class TurnEvent:
    kind: Kind
    index: int  # the choice
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    call: int = 0  # tool call index within the message
    call_id: str = ""
    name: str = ""
    # The engine's tokens of `text` where a stage needs them (the decline stage goes on
    # from text already shown); empty where text is not the engine's own.
    token_ids: tuple[int, ...] = ()

    @classmethod
    def finish(cls, index: int, reason: str) -> TurnEvent:
        return cls(Kind.FINISH, index, text=reason)


@dataclass
class Choice:
    """One choice as it was sent."""

    text: str = ""
    calls: list[dict[str, str]] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, ev: TurnEvent) -> None:
        if ev.kind is Kind.TEXT:
            self.text += ev.text
            if ev.logprobs:
                self.logprobs.extend(ev.logprobs)
        elif ev.kind is Kind.CALL:
            self.calls.append({"id": ev.call_id, "name": ev.name, "arguments": ""})
        elif ev.kind is Kind.ARGS:
            self.calls[ev.call]["arguments"] += ev.text
        else:
            self.finish_reason = ev.text

    def message(self) -> dict[str, str]:
        """The answer as the chat template will replay it in later turns."""
        calls = call_text([{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.calls]) if self.calls else ""
        return {"role": "assistant", "content": "\n".join(filter(None, [self.text, calls]))}


class Choices:
    """The accumulator: every choice of a turn, folded from its events."""

    def __init__(self, n: int = 1):
        self.choices = [Choice() for _ in range(n)]

    def add(self, ev: TurnEvent) -> None:
        self.choices[ev.index].add(ev)

    def __getitem__(self, i: int) -> Choice:
        return self.choices[i]

    def __iter__(self):
        return iter(self.choices)


async def first_event(events: AsyncIterator[Any]) -> Any:
    """Run a stream up to its first event, so that errors raised before anything was
    sent become a normal HTTP error rather than an error inside a 200 stream."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None
    except BaseException:
        await events.aclose()
        raise
