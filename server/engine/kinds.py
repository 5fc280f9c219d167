"""Engine kinds: how each kind of engine is loaded, chosen by the model's profile.

A profile with upstreams (or ENCLAVE_UPSTREAMS) is served by `remote` (OpenAI-compatible
vLLM servers elsewhere); any other by `vllm`, in this process and supervised. A new kind
is a loader registered here under its name, and a rule in `kind_of`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import Settings
from server.engine.base import Engine
from server.profiles import ModelProfile
from server.telemetry.metrics import Metrics


@dataclass
class EngineSpec:
    """What a loader gets: the model, where to find it, and the server's hooks."""

    profile: ModelProfile
    checkpoint: Path
    settings: Settings
    metrics: Metrics
    upstreams: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    give_up: Callable[[str], None] = lambda why: None  # an engine that cannot be kept alive
    on_restart: Callable[[Engine], None] = lambda engine: None  # one that came back


Loader = Callable[[EngineSpec], Engine]
KINDS: dict[str, Loader] = {}


def kind(name: str) -> Callable[[Loader], Loader]:
    def register(loader: Loader) -> Loader:
        KINDS[name] = loader
        return loader

    return register


def kind_of(spec: EngineSpec) -> str:
    return "remote" if spec.upstreams else "vllm"


def load_engine(spec: EngineSpec) -> Engine:
    """Blocking (a model load): call it in a thread."""
    return KINDS[kind_of(spec)](spec)


@kind("remote")
def _remote(spec: EngineSpec) -> Engine:
    from server.engine.remote import RemoteEngine

    return RemoteEngine.load(spec.profile, spec.checkpoint, spec.upstreams, spec.settings.upstream_api_key)


@kind("vllm")
def _vllm(spec: EngineSpec) -> Engine:
    from server.engine.supervisor import SupervisedEngine
    from server.engine.vllm import VllmEngine

    settings, profile = spec.settings, spec.profile
    queue_wait = spec.metrics.engine_queue_wait.labels(model=profile.name).observe
    cache = settings.data_dir / "cache" / "outlines" if settings.constraint_cache_mb else None

    def load() -> Engine:
        engine = VllmEngine.load(profile, spec.checkpoint, spec.overrides, constraint_cache=cache, constraint_cache_mb=settings.constraint_cache_mb)
        engine.watch_queue(queue_wait)
        return engine

    return SupervisedEngine(load(), load, give_up=spec.give_up, on_restart=spec.on_restart)
