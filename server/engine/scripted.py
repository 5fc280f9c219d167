"""ScriptedEngine: a deterministic Engine for unit tests of orchestration logic.

Replies are queued by the test and streamed word by word. It honours max_tokens, stop
strings, n and abort the way vLLM does, and records every request it received, so
tests assert on what the serving layer asked for. Never used to test user-facing
behaviour: that is what the end-to-end tests on the real engine are for.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from server.engine.base import Engine, GenerationChunk, GenerationParams, TokenLogprob
from server.errors import ServiceUnavailableError

_WORD = re.compile(r"\s*\S+|\s+")


@dataclass
class ScriptedCall:
    request_id: str
    prompt_token_ids: list[int]
    params: GenerationParams


class ScriptedEngine(Engine):
    def __init__(self, replies: Iterable[str] = (), *, served_model: str = "scripted", max_model_len: int = 512, token_delay: float = 0.0):
        self.served_model = served_model
        self.max_model_len = max_model_len
        self.token_delay = token_delay
        self.up = True  # what available() says: a test takes the engine "down"
        # The next generate fails as a remote engine whose upstreams all refuse does (and
        # marks it down); for tests of what callers do about an outage.
        self.outage = False
        self.replies: deque[str] = deque(replies)
        self.calls: list[ScriptedCall] = []
        self.aborted: set[str] = set()
        self._running: set[str] = set()
        self._vocab: dict[str, int] = {}

    def queue(self, *replies: str) -> None:
        self.replies.extend(replies)

    def available(self) -> bool:
        return self.up

    def _ids(self, text: str) -> list[int]:
        return [self._vocab.setdefault(piece, len(self._vocab)) for piece in _WORD.findall(text)]

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._ids("".join(f" <{m['role']}> {m['content']}" for m in messages) + " <assistant>")

    def count_tokens(self, text: str) -> int:
        return len(_WORD.findall(text))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        self.calls.append(ScriptedCall(request_id, list(prompt_token_ids), params))
        if self.outage:
            self.outage, self.up = False, False
            raise ServiceUnavailableError("no model server is available right now; retry shortly", code="upstream_unavailable")
        replies = [self.replies.popleft() if self.replies else "ok" for _ in range(params.n)]
        self._running.add(request_id)
        try:
            for index, reply in enumerate(replies):
                async for chunk in self._stream(request_id, index, reply, params):
                    yield chunk
        finally:
            self._running.discard(request_id)

    async def _stream(self, request_id: str, index: int, reply: str, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        words = _WORD.findall(reply)
        produced = ""
        for position, word in enumerate(words):
            if request_id in self.aborted:
                yield GenerationChunk(index, "", [], finish_reason="abort")
                return
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            else:
                await asyncio.sleep(0)
            candidate = produced + word
            hit = next((s for s in params.stop if s in candidate), None)
            if hit is not None:
                cut = candidate[: candidate.index(hit)][len(produced):]
                yield GenerationChunk(index, cut, self._ids(cut), finish_reason="stop", stop_reason=hit)
                return
            produced = candidate
            logprobs = [TokenLogprob(word, -0.5, ((word, -0.5),) * (params.logprobs or 0))] if params.logprobs is not None else None
            last = position == len(words) - 1
            at_limit = position + 1 >= params.max_tokens
            finish = "stop" if last else "length" if at_limit else None
            yield GenerationChunk(index, word, self._ids(word), finish_reason=finish, logprobs=logprobs)
            if finish:
                return
        if not words:
            yield GenerationChunk(index, "", [], finish_reason="stop")

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def num_unfinished_requests(self) -> int:
        return len(self._running)

    async def shutdown(self) -> None:
        self._running.clear()
