"""Chat completions: a turn's events as one `chat.completion`, or as chunks over SSE."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

from server.errors import EnclaveError
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChoiceLogprobs,
    TokenLogprobOut,
    ToolCall,
    Usage,
    chunk_choice,
    chunk_json,
    logprobs_out,
)
from server.turn.encoders.sse import data, sse
from server.turn.events import Choices, Kind, TurnEvent, first_event
from server.turn.pipeline import ChatServing, TurnRun
from server.turn.state import Turn


async def complete(serving: ChatServing, turn: Turn) -> ChatCompletion:
    run = serving.run(turn)
    n = turn.step.params.n
    choices = Choices(n)
    try:
        async for ev in run.events:
            choices.add(ev)
    finally:
        await run.aclose()
    want_logprobs = turn.step.params.logprobs is not None
    return ChatCompletion(
        id=turn.request_id,
        created=turn.req.created,
        model=turn.req.request.model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(
                    content=c.text if c.text or not c.calls else None,
                    tool_calls=[ToolCall(id=x["id"], function={"name": x["name"], "arguments": x["arguments"]}) for x in c.calls] or None,
                ),
                logprobs=ChoiceLogprobs(content=[TokenLogprobOut.model_validate(x) for x in logprobs_out(c.logprobs)]) if want_logprobs else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=serving.usage(run.progress),
        **serving.extensions(turn),
    )


async def open_stream(serving: ChatServing, turn: Turn) -> AsyncIterator[str]:
    """Start generating and return the SSE body; errors before the first event raise."""
    run = serving.run(turn)
    return sse(run, await first_event(run.events), _ChunkEncoder(serving, run))


class _ChunkEncoder:
    trailer = "data: [DONE]\n\n"

    def __init__(self, serving: ChatServing, run: TurnRun):
        self.serving = serving
        self.run = run
        self.turn = run.turn
        request = run.turn.req.request
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def _chunk(self, choices: list[dict], usage: Usage | None = None, extra: dict | None = None) -> str:
        body = chunk_json(self.turn.request_id, self.turn.req.created, self.turn.req.request.model, choices, usage)
        if self.include_usage and usage is None:
            body["usage"] = None
        if extra:
            body.update(extra)
        return data(body)

    def opening(self) -> Iterable[str]:
        yield self._chunk([chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(self.turn.step.params.n)])

    def frames(self, ev: TurnEvent) -> Iterable[str]:
        if ev.kind is Kind.TEXT:
            yield self._chunk([chunk_choice(ev.index, {"content": ev.text}, None, ev.logprobs)])
        elif ev.kind is Kind.CALL:
            call = {"index": ev.call, "id": ev.call_id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
            yield self._chunk([chunk_choice(ev.index, {"tool_calls": [call]})])
        elif ev.kind is Kind.ARGS:
            yield self._chunk([chunk_choice(ev.index, {"tool_calls": [{"index": ev.call, "function": {"arguments": ev.text}}]})])
        else:
            yield self._chunk([chunk_choice(ev.index, {}, ev.text)], extra=self.serving.extensions(self.turn))

    def closing(self) -> Iterable[str]:
        if self.include_usage:
            ledger = self.turn.ledger
            cost = ledger.cost_info() if ledger is not None else None
            yield self._chunk([], self.serving.usage(self.run.progress), {"cost": cost} if cost is not None else None)

    def failed(self, exc: EnclaveError) -> Iterable[str]:
        yield f"data: {json.dumps(exc.to_body())}\n\n"
