"""Prometheus metrics, one registry per app so several apps (tests) never collide."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Buckets sized for a CPU box (hundreds of ms) up to a loaded GPU fleet (tens of seconds).
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("enclave_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r)
        self.ttft = Histogram("enclave_time_to_first_token_seconds", "Time from request to first output token", ["model"], buckets=_LATENCY, registry=r)
        self.e2e = Histogram("enclave_e2e_request_latency_seconds", "Time from request to last output token", ["model"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("enclave_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("enclave_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.running = Gauge("enclave_requests_running", "Generations in progress in the serving layer", ["model"], registry=r)
        self.aborted = Counter("enclave_requests_aborted", "Generations stopped before they finished", ["model", "reason"], registry=r)
        self.finished = Counter("enclave_requests_finished", "Generations by finish reason", ["model", "finish_reason"], registry=r)
        self.embedding_inputs = Counter("enclave_embedding_inputs", "Texts embedded", ["model"], registry=r)
        self.engine_unfinished = Gauge("enclave_engine_unfinished_requests", "Requests the engine holds (running or waiting)", registry=r)
        self.ready = Gauge("enclave_ready", "1 once the engine and embedder are loaded", registry=r)

    def watch_engine(self, unfinished: Callable[[], int]) -> None:
        self.engine_unfinished.set_function(unfinished)

    def render(self) -> bytes:
        return generate_latest(self.registry)
