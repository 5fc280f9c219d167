"""The Engine protocol: what the serving layer needs from any model backend.

Engine-neutral types only; each backend converts GenerationParams into its own
sampling parameters, so the remote and scripted engines see exactly what vLLM sees.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any


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
    # Phrases the output may not contain (vLLM's bad_words: the phrase's last token is
    # ruled out after the rest of it).
    bad_words: tuple[str, ...] = ()


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


class Engine(ABC):
    """A text-generation backend. ``served_model`` is the profile name.

    Besides generating, an engine declares its health: whether it can take a turn now
    (`available`), its lifecycle (`state`, `is_dead`), its scheduler's counts, and the
    background watchers it runs (`start`, `watch_health`). The defaults describe an
    in-process engine that is always up and watches nothing."""

    served_model: str
    max_model_len: int

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` under the model's chat template, ready to generate."""

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]: ...

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def num_unfinished_requests(self) -> int: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    def available(self) -> bool:
        """Whether a turn can be sent now (a remote engine: some upstream is up)."""
        return True

    @property
    def state(self) -> str:
        """"serving", or a supervised engine's "restarting" or "failed"."""
        return "serving"

    def is_dead(self) -> bool:
        """True once the engine can never generate again (its core process is gone)."""
        return False

    def scheduler_counts(self) -> tuple[int, int] | None:
        """(running, waiting) as the scheduler last reported them; None: not known."""
        return None

    def start(self) -> None:
        """Start the engine's own background watchers (call it on the event loop)."""

    def watch_health(self) -> None:
        """Probe the engine's health periodically from now on (routing needs it)."""


class EngineWrapper(Engine):
    """An engine around another one: everything it does not change is the inner one's."""

    def __init__(self, inner: Engine):
        self._inner = inner

    @property
    def inner(self) -> Engine:
        return self._inner

    @property
    def served_model(self) -> str:  # type: ignore[override]
        return self.inner.served_model

    @property
    def max_model_len(self) -> int:  # type: ignore[override]
        return self.inner.max_model_len

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.inner.render_chat(messages)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        return self.inner.generate(request_id, prompt_token_ids, params)

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    def num_unfinished_requests(self) -> int:
        return self.inner.num_unfinished_requests()

    async def shutdown(self) -> None:
        await self.inner.shutdown()

    def available(self) -> bool:
        return self.inner.available()

    @property
    def state(self) -> str:
        return self.inner.state

    def is_dead(self) -> bool:
        return self.inner.is_dead()

    def scheduler_counts(self) -> tuple[int, int] | None:
        return self.inner.scheduler_counts()

    def start(self) -> None:
        self.inner.start()

    def watch_health(self) -> None:
        self.inner.watch_health()
