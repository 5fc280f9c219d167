"""The Engine protocol: what the serving layer needs from any model backend.

Engine-neutral types only; each backend converts GenerationParams into its own
sampling parameters, so the remote and scripted engines see exactly what vLLM sees.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    # Number of top alternatives per sampled token; None: no logprobs at all.
    logprobs: int | None = None
    # A JSON schema the output must match (response_format json_schema / json_object).
    json_schema: dict[str, Any] | None = None
    # A regular expression the whole output must match (tool calls); wins over json_schema.
    regex: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class GenerationChunk:
    """New output of one choice (``index``) since its previous chunk."""

    index: int
    text: str
    token_ids: Sequence[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """A text-generation backend. ``served_model`` is the profile name."""

    served_model: str
    max_model_len: int

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` under the model's chat template, ready to generate."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]: ...

    async def abort(self, request_id: str) -> None: ...

    def num_unfinished_requests(self) -> int: ...

    async def shutdown(self) -> None: ...
