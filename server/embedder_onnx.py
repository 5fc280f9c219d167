"""The embedding model's transformer run by onnxruntime, for the short interactive texts
(a turn's message, a search query) that every stage waits on.

On these CPUs one short text takes ~12 ms through sentence-transformers and PyTorch and
~3 ms through onnxruntime (`scripts/bench_memory.py` prints both). The graph is exported
from the very model the server loaded (never downloaded), once, into a cache directory
keyed by the model's weights; pooling and normalisation are the sentence-transformers
pipeline's own (mean over the attention mask, then L2). At load, the two paths must agree
on probe texts, or the ONNX path is not used: documents are embedded by PyTorch in bulk,
queries here, and both must land in the same space.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# How far the two paths may differ (observed: 1e-7) before the ONNX one is refused.
TOLERANCE = 1e-4
PROBES = ["How long do refunds take?", "Where is my order 1042? It has not arrived and the tracking page says nothing."]


def _pipeline_is_mean_pooled(model: Any) -> bool:
    """Transformer, mean pooling, normalisation: the only pipeline this module reproduces."""
    names = [type(m).__name__ for m in model]
    if names != ["Transformer", "Pooling", "Normalize"]:
        return False
    pooling = model[1]
    # sentence-transformers 6 names the mode; older versions set one flag per mode.
    mode = getattr(pooling, "pooling_mode", None)
    if mode is not None:
        return mode == "mean"
    flags = {m: bool(getattr(pooling, f"pooling_mode_{m}", False)) for m in ("mean_tokens", "cls_token", "max_tokens", "mean_sqrt_len_tokens")}
    return flags == {"mean_tokens": True, "cls_token": False, "max_tokens": False, "mean_sqrt_len_tokens": False}


def _weights_key(model_dir: Path) -> str:
    """The cache key: the weights' names, sizes and times (hashing 90 MB at every start
    would cost more than it saves)."""
    import torch

    h = hashlib.sha256(f"torch {torch.__version__}\0".encode())
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"):
            st = p.stat()
            h.update(f"{p.relative_to(model_dir)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:24]


def _export(transformer: Any, tokenizer: Any) -> bytes:
    import torch

    class Hidden(torch.nn.Module):
        # The model's forward takes keyword arguments; the exporter passes positions.
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    sample = tokenizer(["an example"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    out = io.BytesIO()
    # The tracer warns about shape-dependent branches of the model; the probes at load
    # check the graph's output instead.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Hidden(transformer.eval()),
            tuple(sample[n] for n in names),
            out,
            input_names=names,
            output_names=["hidden"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]},
            opset_version=17,
            dynamo=False,
        )
    return out.getvalue()


def default_cache_dir() -> Path:
    """Shared by every server and test on the machine: the export depends only on the
    weights (its key), and takes seconds."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "enclave" / "embedder-onnx"


def _keep(graph: bytes, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(graph)
        tmp.replace(path)  # whole or not at all, if servers start together
    except OSError as exc:  # a read-only home: export again next time
        log.warning("embedder: cannot keep the ONNX export in %s: %s", path.parent, exc)


class OnnxEncoder:
    def __init__(self, session: Any, tokenizer: Any, max_tokens: int):
        self._session = session
        self._tokenizer = tokenizer
        self._max_tokens = max_tokens

    @classmethod
    def load(cls, model: Any, model_dir: Path, cache_dir: Path | None) -> OnnxEncoder | None:
        """The ONNX path for this sentence-transformers model, or None (logged) when it
        cannot reproduce it."""
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        if not _pipeline_is_mean_pooled(model):
            log.info("embedder: no ONNX path (the model's pipeline is not transformer + mean pooling + normalisation)")
            return None
        transformer = model[0].auto_model
        tokenizer = model.tokenizer
        try:
            path = cache_dir / f"{_weights_key(model_dir)}.onnx" if cache_dir else None
            if path is not None and path.is_file():
                graph = path.read_bytes()
            else:
                graph = _export(transformer, tokenizer)
                if path is not None:
                    _keep(graph, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = min(2, os.cpu_count() or 1)
            options.inter_op_num_threads = 1
            # Idle threads sleep instead of spinning: on these few cores a spinning pool
            # would take time from the engine between two queries.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception:
            log.exception("embedder: exporting the model to ONNX failed; PyTorch embeds everything")
            return None
        encoder = cls(session, tokenizer, int(model.max_seq_length))
        reference = model.encode(PROBES, normalize_embeddings=True, convert_to_numpy=True)
        gap = float(np.abs(encoder.encode(PROBES) - reference).max())
        if gap > TOLERANCE:
            log.warning("embedder: the ONNX path differs from PyTorch by %.2g; not used", gap)
            return None
        return encoder

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_tokens, return_tensors="np")
        feed = {i.name: batch[i.name].astype(np.int64) for i in self._session.get_inputs()}
        hidden = self._session.run(None, feed)[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        return (pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)
