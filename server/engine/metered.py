"""MeteredEngine: every generation, whoever asks for it (a turn's model call, the
context window's summary, a rail's self-check), is timed on the engine clock, charged
to the turn in progress and traced as a GenAI `chat` span under it.

Wrapping the engine rather than the turn's own generation loop is what makes engine
time add up: calls made on a turn's behalf by memory or rails are its cost too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from server.deadlines import watched
from server.engine.base import Engine, EngineWrapper, GenerationChunk, GenerationParams
from server.telemetry import tracing
from server.telemetry.cost import EngineClock, current_charge


class MeteredEngine(EngineWrapper):
    def __init__(self, inner: Engine, clock: EngineClock, provider: str = tracing.PROVIDER):
        super().__init__(inner)
        self.clock = clock
        self.provider = provider
        # When the engine last produced output for any request (the stall watch's clock).
        self.last_output = 0.0

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        charge = current_charge.get()
        span = tracing.child(
            f"chat {self.inner.served_model}",
            gen_ai__operation__name="chat",
            gen_ai__provider__name=self.provider,
            gen_ai__request__model=self.inner.served_model,
            gen_ai__request__max_tokens=params.max_tokens,
            gen_ai__request__temperature=params.temperature,
            gen_ai__request__top_p=params.top_p,
            gen_ai__request__choice__count=params.n if params.n > 1 else None,
            gen_ai__output__type="json" if params.regex is not None or params.json_schema is not None else "text",
            gen_ai__response__id=request_id,
            gen_ai__usage__input_tokens=len(prompt_token_ids),
        )
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        finished: dict[int, str] = {}
        mark = self.clock.enter()
        inner = self.inner.generate(request_id, prompt_token_ids, params)
        # Under the request's deadline: a stalled engine fails the request, never hangs it.
        stream = watched(inner, lambda: self.inner.abort(request_id), lambda: self.last_output)
        try:
            async for chunk in stream:
                self.last_output = time.monotonic()
                if chunk.token_ids:
                    tokens += len(chunk.token_ids)
                    if first is None:
                        first = time.perf_counter()
                if chunk.finish_reason is not None:
                    finished[chunk.index] = chunk.finish_reason
                if charge is not None and chunk.finish_reason is None and charge.over(self.clock.share(mark)):
                    # The turn has used what its budget hold covers: stop here, as
                    # max_tokens would, rather than spend what the key does not have.
                    charge.capped = True
                    yield chunk
                    for i in range(params.n):
                        if i not in finished:
                            finished[i] = "length"
                            yield GenerationChunk(index=i, text="", token_ids=[], finish_reason="length")
                    await self.inner.abort(request_id)
                    return
                yield chunk
        finally:
            seconds = self.clock.leave(mark)
            if charge is not None:
                charge.add(seconds)
            ended = time.perf_counter()
            tracing.set_attributes(
                span,
                gen_ai__response__model=self.inner.served_model,
                gen_ai__usage__output_tokens=tokens,
                gen_ai__response__finish_reasons=[finished[i] for i in sorted(finished)] or ["abort"],
                gen_ai__response__time_to_first_chunk=round(first - started, 6) if first is not None else None,
                # Decode pace: tokens after the first, over the time after the first.
                enclave__tokens_per_second=round((tokens - 1) / (ended - first), 3) if first is not None and ended > first and tokens > 1 else None,
                enclave__engine_seconds=round(seconds, 6),
                enclave__budget_capped=True if charge is not None and charge.capped else None,
            )
            span.end()
            await stream.aclose()
            await inner.aclose()
