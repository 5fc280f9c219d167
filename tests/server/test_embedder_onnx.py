"""The ONNX path of the embedder (server/embedder_onnx.py) gives the vectors PyTorch gives:
queries embedded by it must land where documents embedded in bulk by PyTorch are."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.embedder import Embedder, packaged_model_dir
from server.embedder_onnx import OnnxEncoder, _pipeline_is_mean_pooled


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def embedder(cached):
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2", cache_dir=cached)


def test_short_texts_take_the_onnx_path_and_match_pytorch(embedder):
    assert embedder._onnx is not None
    texts = [
        "How long do refunds take?",
        "Ünïcödé, emoji 🚚 and numbers 1042",
        "x",
        # Past the model's 256 tokens: both paths cut it at the same place.
        " ".join(["The parcel travels by ferry to the islands."] * 80),
    ]
    onnx = asyncio.run(embedder.embed(texts))  # one padded batch
    torch_vectors = embedder._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert onnx.shape == torch_vectors.shape == (4, 384)
    assert np.abs(onnx - torch_vectors).max() < 1e-4
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)


def test_the_export_is_kept_and_read_back(embedder, cached):
    (graph,) = cached.glob("*.onnx")
    again = OnnxEncoder.load(embedder._model, packaged_model_dir(), cached)
    assert again is not None and list(cached.glob("*.onnx")) == [graph]
    assert np.abs(again.encode(["a refund"]) - embedder._onnx.encode(["a refund"])).max() < 1e-6


def test_a_pipeline_it_does_not_reproduce_stays_on_pytorch(embedder):
    pooling = embedder._model[1]
    before = pooling.pooling_mode
    try:
        pooling.pooling_mode = "cls"
        assert not _pipeline_is_mean_pooled(embedder._model)
        assert OnnxEncoder.load(embedder._model, packaged_model_dir(), None) is None
    finally:
        pooling.pooling_mode = before


def test_stages_asking_for_one_text_at_once_share_one_encode(embedder):
    # The input rails and the response cache's lookup embed a turn's message together.
    encodes = []
    before = embedder.gate.hold

    def counted(tenant=None):
        encodes.append(tenant)
        return before(tenant)

    embedder.gate.hold = counted
    try:

        async def together():
            return await asyncio.gather(*(embedder.embed_one("Where is parcel 7731?") for _ in range(3)), embedder.embed_one("Another text"))

        a, b, c, other = asyncio.run(together())
    finally:
        del embedder.gate.hold
    assert len(encodes) == 2 and a is b is c and not np.array_equal(a, other)
    assert embedder._recent.pending == {}
