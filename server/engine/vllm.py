"""VllmEngine: vLLM's AsyncLLM running in this process (its engine core in a child)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator

from server.engine.base import Engine, GenerationChunk, GenerationParams, TokenLogprob
from server.errors import (
    ConfigError,
    EngineError,
    InvalidRequestError,
    ServiceUnavailableError,
)
from server.profiles import ModelProfile
from server.toolcalls.constraint import response_format_regex

log = logging.getLogger(__name__)


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


def kv_bytes_per_token(checkpoint: Path, dtype: str) -> int | None:
    """What one token of context costs in the KV cache: keys and values, every layer,
    every KV head, from the checkpoint's config.json; None when it does not say."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    if not isinstance(layers, int) or not isinstance(heads, int):
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 2)


def engine_arguments(profile: ModelProfile, checkpoint: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The AsyncEngineArgs for a profile; scripts/bench.py gives vLLM's server the same.

    On a CPU the KV cache is sized from the profile (`kv_cache_sequences` full-context
    sequences at the model's bytes per token) rather than vLLM's flat default; an explicit
    `kv_cache_memory_bytes` (profile or ENCLAVE_ENGINE_OVERRIDES) or VLLM_CPU_KVCACHE_SPACE
    (GiB, which vLLM applies over both) wins."""
    args: dict[str, Any] = {
        "model": str(checkpoint),
        "served_model_name": [profile.name],
        "dtype": profile.dtype,
        "max_model_len": profile.context_length,
        "disable_log_stats": True,
    }
    args.update(profile.engine_args)
    args.update(overrides or {})
    if profile.device == "cpu" and profile.kv_cache_sequences and "kv_cache_memory_bytes" not in args:
        dtype = args.get("kv_cache_dtype") if args.get("kv_cache_dtype") not in (None, "auto") else args["dtype"]
        per_token = kv_bytes_per_token(checkpoint, str(dtype))
        if per_token is not None:
            mib = 1 << 20
            # vLLM's blocks and per-layer layout need a little more than the bare bytes:
            # with none to spare it refuses to start ("not enough KV cache memory").
            wanted = profile.kv_cache_sequences * int(args["max_model_len"]) * per_token * 17 // 16
            args["kv_cache_memory_bytes"] = -(-wanted // mib) * mib  # whole MiB, rounded up
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


def prune_cache(directory: Path, limit_mb: int) -> None:
    """Empty the constraint cache once it has grown past `limit_mb` (it holds one entry
    per distinct tool set clients ever sent, and vLLM never evicts)."""
    files = [p for p in directory.rglob("*") if p.is_file()] if directory.is_dir() else []
    size = sum(p.stat().st_size for p in files)
    if size > limit_mb * (1 << 20):
        log.info("constraint cache %s holds %.0f MB, over %d MB: emptying it", directory.name, size / (1 << 20), limit_mb)
        for p in files:
            p.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)


class VllmEngine(Engine):
    def __init__(self, llm: Any, tokenizer: Any, profile: ModelProfile, max_model_len: int):
        self._llm = llm
        self._tokenizer = tokenizer
        self.served_model = profile.name
        self.max_model_len = max_model_len
        self._counts: _SchedulerCounts | None = None  # set by load()
        # Token sequences of each bad-words list, by the list (see _bad_word_ids).
        self._bad_words: dict[tuple[str, ...], list[list[int]]] = {}

    @classmethod
    def load(
        cls, profile: ModelProfile, checkpoint: Path, overrides: dict[str, Any] | None = None, *, constraint_cache: Path | None = None, constraint_cache_mb: int = 0
    ) -> "VllmEngine":
        """Start the engine (blocking, ~25 s for SmolLM2 on 2 cores): call it in a thread.

        Constraint compiles get no wall-clock limit: vLLM's default (5 s) failed valid
        schemas on a busy machine; their size is bounded before they get here
        (server/toolcalls/constraint.py). With `constraint_cache`, compiled constraints
        persist there across restarts (vLLM's outlines disk cache)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_REGEX_COMPILATION_TIMEOUT_S", "0")
        if constraint_cache is not None:
            prune_cache(constraint_cache, constraint_cache_mb)
            os.environ.setdefault("VLLM_V1_USE_OUTLINES_CACHE", "1")
            os.environ.setdefault("OUTLINES_CACHE_DIR", str(constraint_cache))
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

    def watch_queue(self, observe: Any) -> None:
        """`observe(seconds)` for each request's wait in the engine's queue, as vLLM measures it."""
        if self._counts is not None:
            self._counts.on_queued = observe

    def scheduler_counts(self) -> tuple[int, int]:
        """(running, waiting) as the engine's scheduler last reported them."""
        if self.num_unfinished_requests() == 0:
            return 0, 0  # its last report may predate the last request's end
        counts = self._counts
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
            structured = StructuredOutputsParams(regex=response_format_regex(params.json_schema))
        sampling = SamplingParams(
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
        if params.bad_words:
            # Handed over tokenised: vLLM would tokenise every phrase (twice) for every
            # request, a few milliseconds of the request's way to the engine.
            sampling._bad_words_token_ids = [list(ids) for ids in self._bad_word_ids(params.bad_words)]
        return sampling

    def _bad_word_ids(self, words: tuple[str, ...]) -> list[list[int]]:
        """vLLM's own tokenisation of a bad-words list (each phrase alone and after a
        space, as its SamplingParams does it), computed once per list: the lists are the
        rails' configured phrases, so there are few."""
        found = self._bad_words.get(words)
        if found is None:
            from vllm import SamplingParams

            probe = SamplingParams(bad_words=list(words))
            probe.update_from_tokenizer(self._llm.get_tokenizer())
            found = probe.bad_words_token_ids or []
            if len(self._bad_words) >= 64:  # a caller's own lists could vary: bounded
                self._bad_words.clear()
            self._bad_words[words] = found
        return found

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        try:
            sampling = self._sampling_params(params)
        except VLLMClientError as exc:  # a bad-words list vLLM refuses
            raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)) from None
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

    def is_dead(self) -> bool:
        """vLLM's own verdict: an engine-core process exited, or its output loop failed."""
        return bool(self._llm.errored)

    async def shutdown(self) -> None:
        self._llm.shutdown()


class _SchedulerCounts:
    """Running and waiting requests from vLLM's per-step scheduler stats (a stat logger
    is vLLM's documented hook for them)."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        # Called with each finished request's seconds in the engine's queue (metrics).
        self.on_queued: Any = None

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
                if iteration_stats is not None and counts.on_queued is not None:
                    for finished in iteration_stats.finished_requests:
                        counts.on_queued(finished.queued_time)

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
