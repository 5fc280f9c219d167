"""The per-turn pipeline for chat completions.

Today a turn is: check the model → render the chat template → check the context window
→ generate → shape the OpenAI response. Guardrails, memory, tools and persistence slot in
here, in this order, as they arrive; routes stay thin and engines stay unaware of HTTP.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from server.engine.base import Engine, GenerationChunk, GenerationParams, TokenLogprob
from server.errors import EnclaveError, EngineError, InvalidRequestError, ModelNotFoundError
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    TokenLogprobOut,
    Usage,
    chunk_choice,
    chunk_json,
    logprobs_out,
)
from server.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Turn:
    """A validated chat request, rendered and ready for the engine."""

    request_id: str
    request: ChatCompletionRequest
    prompt_token_ids: list[int]
    params: GenerationParams
    started: float
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Progress:
    """What a generation has produced so far, per choice, for usage and metrics."""

    completion_tokens: int = 0
    first_token_at: float | None = None
    finished: set[int] = field(default_factory=set)


class ChatServing:
    def __init__(self, engine: Engine, metrics: Metrics, served_names: list[str], embedding_model: str | None = None):
        self.engine = engine
        self.metrics = metrics
        self.served_names = served_names
        self.embedding_model = embedding_model
        self.model = engine.served_model
        # Label children resolved once: the per-token path should not hash label dicts.
        self._tokens_out = metrics.generation_tokens.labels(model=self.model)
        self._tokens_in = metrics.prompt_tokens.labels(model=self.model)
        self._running = metrics.running.labels(model=self.model)
        self._ttft = metrics.ttft.labels(model=self.model)
        self._e2e = metrics.e2e.labels(model=self.model)

    def prepare(self, request: ChatCompletionRequest, started: float) -> Turn:
        if request.model not in self.served_names:
            if request.model == self.embedding_model:
                raise InvalidRequestError(f"The model `{request.model}` is an embedding model; use /v1/embeddings.", param="model")
            raise ModelNotFoundError(f"The model `{request.model}` does not exist.", param="model")
        prompt = self.engine.render_chat(request.chat_messages())
        params = request.to_generation_params(len(prompt), self.engine.max_model_len)
        return Turn(f"chatcmpl-{uuid.uuid4().hex}", request, prompt, params, started)

    # ------------------------------------------------------------ generation

    async def _generate(self, turn: Turn, progress: _Progress) -> AsyncIterator[GenerationChunk]:
        """The engine stream with metrics and abort-on-exit wrapped around it.

        The first chunk is pulled before anything is sent to the client, so a request the
        engine rejects still gets a proper HTTP status instead of an error mid-stream.
        """
        self._running.inc()
        self._tokens_in.inc(len(turn.prompt_token_ids))
        stream = self.engine.generate(turn.request_id, turn.prompt_token_ids, turn.params)
        try:
            async for chunk in stream:
                if chunk.token_ids:
                    if progress.first_token_at is None:
                        progress.first_token_at = time.perf_counter()
                        self._ttft.observe(progress.first_token_at - turn.started)
                    progress.completion_tokens += len(chunk.token_ids)
                    self._tokens_out.inc(len(chunk.token_ids))
                if chunk.finish_reason == "error":
                    raise self._engine_failure(turn, progress)
                if chunk.finish_reason is not None:
                    progress.finished.add(chunk.index)
                    self.metrics.finished.labels(model=self.model, finish_reason=chunk.finish_reason).inc()
                yield chunk
        finally:
            self._running.dec()
            if len(progress.finished) < turn.params.n:
                # The client went away (or we failed): free the engine's slot now rather
                # than letting it generate tokens nobody will read.
                await self.engine.abort(turn.request_id)
                self.metrics.aborted.labels(model=self.model, reason="client_disconnected").inc()
            else:
                self._e2e.observe(time.perf_counter() - turn.started)
            await stream.aclose()

    def _engine_failure(self, turn: Turn, progress: _Progress) -> EnclaveError:
        if turn.params.json_schema is not None and progress.completion_tokens == 0:
            # vLLM compiles the constraint in its engine core and reports a failure only
            # as finish_reason "error"; a schema too complex to compile is the usual cause.
            return InvalidRequestError(
                "response_format: the JSON schema could not be compiled into an output constraint "
                "(too complex or unsupported); simplify the schema",
                param="response_format",
                code="invalid_json_schema",
            )
        return EngineError("the engine failed while generating")

    def _usage(self, turn: Turn, progress: _Progress) -> Usage:
        prompt = len(turn.prompt_token_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=progress.completion_tokens, total_tokens=prompt + progress.completion_tokens)

    async def complete(self, turn: Turn) -> ChatCompletion:
        n = turn.params.n
        texts = [""] * n
        finish: list[str | None] = [None] * n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        progress = _Progress()
        async for chunk in self._generate(turn, progress):
            texts[chunk.index] += chunk.text
            if chunk.logprobs:
                logprobs[chunk.index].extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                finish[chunk.index] = chunk.finish_reason
        want_logprobs = turn.params.logprobs is not None
        return ChatCompletion(
            id=turn.request_id,
            created=turn.created,
            model=turn.request.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=texts[i]),
                    logprobs=ChoiceLogprobs(content=[TokenLogprobOut.model_validate(x) for x in logprobs_out(logprobs[i])]) if want_logprobs else None,
                    finish_reason=finish[i],
                )
                for i in range(n)
            ],
            usage=self._usage(turn, progress),
        )

    async def open_stream(self, turn: Turn) -> AsyncIterator[str]:
        """Start generating and return the SSE body; errors before the first token raise."""
        progress = _Progress()
        chunks = self._generate(turn, progress)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise
        return self._sse(turn, progress, chunks, first)

    async def _sse(self, turn: Turn, progress: _Progress, chunks: AsyncIterator[GenerationChunk], first: GenerationChunk | None) -> AsyncIterator[str]:
        include_usage = bool(turn.request.stream_options and turn.request.stream_options.include_usage)
        model = turn.request.model

        def event(choices: list[dict], usage: Usage | None = None) -> str:
            body = chunk_json(turn.request_id, turn.created, model, choices, usage)
            if include_usage and usage is None:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        try:
            yield event([chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(turn.params.n)])
            pending = [first] if first is not None else []
            while True:
                for chunk in pending:
                    if chunk.text or chunk.finish_reason is not None:
                        delta = {"content": chunk.text} if chunk.text else {}
                        yield event([chunk_choice(chunk.index, delta, chunk.finish_reason, chunk.logprobs)])
                try:
                    pending = [await anext(chunks)]
                except StopAsyncIteration:
                    break
            if include_usage:
                yield event([], self._usage(turn, progress))
        except EnclaveError as exc:
            # Headers are gone; OpenAI clients raise on an `error` event in the stream.
            yield f"data: {json.dumps(exc.to_body())}\n\n"
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"
