"""VllmEngine: vLLM's AsyncLLM running in this process (its engine core in a child)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator

from server.engine.base import GenerationChunk, GenerationParams, TokenLogprob
from server.errors import (
    ConfigError,
    EngineError,
    InvalidRequestError,
    ServiceUnavailableError,
)
from server.profiles import ModelProfile

log = logging.getLogger(__name__)

# Compact JSON under constraint: with free whitespace small models can emit newlines
# until max_tokens without ever closing the object.
JSON_WHITESPACE = r"[ ]?"


def engine_arguments(profile: ModelProfile, checkpoint: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The AsyncEngineArgs for a profile; scripts/bench.py gives vLLM's server the same."""
    args: dict[str, Any] = {
        "model": str(checkpoint),
        "served_model_name": [profile.name],
        "dtype": profile.dtype,
        "max_model_len": profile.context_length,
        "disable_log_stats": True,
    }
    args.update(profile.engine_args)
    args.update(overrides or {})
    return args


def api_server_flags(args: dict[str, Any]) -> list[str]:
    """Engine arguments as flags of vLLM's own OpenAI server (`vllm.entrypoints.openai.
    api_server`): how a remote upstream serves a profile exactly as we would in-process."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


class VllmEngine:
    def __init__(self, llm: Any, tokenizer: Any, profile: ModelProfile, max_model_len: int):
        self._llm = llm
        self._tokenizer = tokenizer
        self.served_model = profile.name
        self.max_model_len = max_model_len

    @classmethod
    def load(cls, profile: ModelProfile, checkpoint: Path, overrides: dict[str, Any] | None = None) -> "VllmEngine":
        """Start the engine (blocking, ~25 s for SmolLM2 on 2 cores): call it in a thread."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        for key, value in profile.env.items():
            os.environ.setdefault(key, value)
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            engine_args = AsyncEngineArgs(**engine_arguments(profile, checkpoint, overrides))
        except TypeError as exc:
            raise ConfigError(f"model profile {profile.name} has an unknown engine argument: {exc}") from None
        counts = _SchedulerCounts()
        llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[counts.factory()])
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        max_len = llm.vllm_config.model_config.max_model_len
        engine = cls(llm, tokenizer, profile, max_len)
        engine._counts = counts
        return engine

    def scheduler_counts(self) -> tuple[int, int]:
        """(running, waiting) as the engine's scheduler last reported them."""
        if self.num_unfinished_requests() == 0:
            return 0, 0  # its last report may predate the last request's end
        counts = getattr(self, "_counts", None)
        return (counts.running, counts.waiting) if counts is not None else (self.num_unfinished_requests(), 0)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already carries the special tokens (BOS, role markers).
        return self._tokenizer.encode(text, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def _sampling_params(self, params: GenerationParams) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if params.regex is not None:
            structured = StructuredOutputsParams(regex=params.regex)
        elif params.json_schema is not None:
            structured = StructuredOutputsParams(json=params.json_schema, whitespace_pattern=JSON_WHITESPACE)
        return SamplingParams(
            n=params.n,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            seed=params.seed,
            stop=list(params.stop) or None,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            min_tokens=params.min_tokens,
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured,
        )

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        try:
            sampling = self._sampling_params(params)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        try:
            async for output in self._llm.generate(_token_prompt(prompt_token_ids), sampling, request_id):
                for completion in output.outputs:
                    yield GenerationChunk(
                        index=completion.index,
                        text=completion.text,
                        token_ids=completion.token_ids,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                        logprobs=_logprobs(completion.logprobs, completion.token_ids, params.logprobs) if params.logprobs is not None else None,
                    )
        except VLLMClientError as exc:
            raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)) from None
        except EngineDeadError:
            raise ServiceUnavailableError("the engine stopped; the server must be restarted", code="engine_dead") from None
        except EngineGenerateError as exc:
            log.error("engine failed on request %s: %r", request_id, exc.__cause__)
            raise EngineError("the engine failed while generating") from None

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    async def shutdown(self) -> None:
        self._llm.shutdown()


class _SchedulerCounts:
    """Running and waiting requests from vLLM's per-step scheduler stats (a stat logger
    is vLLM's documented hook for them)."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0

    def factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        counts = self

        class SchedulerCountsLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0):
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    counts.running = scheduler_stats.num_running_reqs
                    counts.waiting = scheduler_stats.num_waiting_reqs

            def log_engine_initialized(self) -> None:
                pass

        return SchedulerCountsLogger


def _token_prompt(token_ids: list[int]) -> Any:
    # Newer vLLM takes a pre-tokenised EngineInput and skips its own rendering;
    # older releases (the GPU wheel may lag or lead) take the TokensPrompt dict.
    try:
        from vllm.inputs.engine import tokens_input
    except ImportError:
        return {"prompt_token_ids": token_ids}
    return tokens_input(token_ids)


def _logprobs(entries: Any, token_ids: Any, k: int) -> list[TokenLogprob]:
    # vLLM gives, per position, the k best tokens (rank 1..k) plus the sampled one with
    # its own rank, which may lie beyond k. -inf is not JSON, so it is clamped as OpenAI does.
    result: list[TokenLogprob] = []
    for token_id, alternatives in zip(token_ids, entries or []):
        chosen = alternatives[token_id]
        top = sorted((lp for lp in alternatives.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        result.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=max(chosen.logprob, -9999.0),
                top=tuple((alt.decoded_token or "", max(alt.logprob, -9999.0)) for alt in top),
            )
        )
    return result
