"""Prometheus metrics, one registry per app so several apps (tests) never collide."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Buckets sized for a CPU box (hundreds of ms) up to a loaded GPU fleet (tens of seconds).
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


# Per output token: milliseconds on a GPU, tens of milliseconds on a CPU box.
_TOKEN = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
# Rails take milliseconds; their latency is the guardrails' whole cost.
_RAIL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class RecentQuantiles:
    """p50 and p95 per rail over its last observations, computed at scrape time.
    (prometheus_client's Summary has no quantiles; the histogram above is for
    aggregating across replicas, this is the direct reading.)"""

    WINDOW = 2048

    def __init__(self) -> None:
        self._samples: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def observe(self, stage: str, rail: str, seconds: float) -> None:
        with self._lock:
            self._samples.setdefault((stage, rail), deque(maxlen=self.WINDOW)).append(seconds)

    def quantiles(self, stage: str, rail: str) -> dict[str, float]:
        with self._lock:
            values = sorted(self._samples.get((stage, rail), ()))
        if not values:
            return {}
        return {q: values[min(len(values) - 1, int(float(q) * len(values)))] for q in ("0.5", "0.95")}

    def collect(self):
        family = GaugeMetricFamily(
            "enclave_rail_latency_recent_seconds", "Rail latency quantiles over the last 2048 runs of each rail", labels=["stage", "rail", "quantile"]
        )
        with self._lock:
            keys = list(self._samples)
        for stage, rail in keys:
            for q, v in self.quantiles(stage, rail).items():
                family.add_metric([stage, rail, q], v)
        yield family


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
        self.tpot = Histogram(
            "enclave_time_per_output_token_seconds", "Time between output tokens of one generation", ["model"], buckets=_TOKEN, registry=r
        )
        self.tool_calls = Counter("enclave_tool_calls", "Server-side tool calls by tool and outcome", ["tool", "outcome"], registry=r)
        self.retrieval_latency = Histogram(
            "enclave_retrieval_latency_seconds", "Knowledge search for one turn, embedding included", buckets=_LATENCY, registry=r
        )
        self.response_cache = Counter(
            "enclave_response_cache", "Response cache lookups (hit_exact, hit_semantic, miss) and answers stored", ["model", "result"], registry=r
        )
        self.recall_latency = Histogram("enclave_memory_recall_latency_seconds", "Episodic memory recall for one turn", buckets=_LATENCY, registry=r)
        self.ingested = Counter("enclave_ingested_files", "Vector-store files indexed, by outcome", ["outcome"], registry=r)
        self.ingest_seconds = Histogram(
            "enclave_ingest_seconds", "Time to index one vector-store file, parsing included", buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600), registry=r
        )
        self.rail_latency = Histogram("enclave_rail_latency_seconds", "Time one rail took", ["stage", "rail"], buckets=_RAIL, registry=r)
        self.rail_verdicts = Counter("enclave_rail_verdicts", "Rail outcomes by rail", ["stage", "rail", "verdict"], registry=r)
        self.rail_quantiles = RecentQuantiles()
        r.register(self.rail_quantiles)
        self.ready = Gauge("enclave_ready", "1 while the engines and the embedder are loaded and serving", registry=r)
        self.engine_restarts = Counter("enclave_engine_restarts", "Times a dead engine was loaded again by the server", ["model"], registry=r)
        # The engine scheduler's own view (vLLM's num_requests_running / _waiting).
        self.engine_running = Gauge("enclave_engine_requests_running", "Requests the engine is running", registry=r)
        self.engine_waiting = Gauge("enclave_engine_requests_waiting", "Requests queued in the engine, not yet scheduled", registry=r)
        self.engine_queue_wait = Histogram(
            "enclave_engine_queue_wait_seconds", "Time a request waited in the engine's queue before it was scheduled", ["model"], buckets=_LATENCY, registry=r
        )
        # Cost: engine time attributed to turns (telemetry/cost.py) at the profile's price.
        self.cost = Counter("enclave_cost_usd", "Attributed engine cost in USD", ["model", "tenant"], registry=r)
        self.engine_seconds = Counter("enclave_engine_seconds_billed", "Engine seconds attributed to turns", ["model"], registry=r)
        self.unbilled_seconds = Counter(
            "enclave_engine_seconds_unbilled", "Engine seconds past a turn's budget ceiling (at most one step each)", ["model"], registry=r
        )

    def watch_engine(self, unfinished: Callable[[], int], scheduler: Callable[[], tuple[int, int] | None]) -> None:
        """`scheduler()`: (running, waiting), or None where the engine does not report them."""
        self.engine_unfinished.set_function(unfinished)
        self.engine_running.set_function(lambda: (scheduler() or (0, 0))[0])
        self.engine_waiting.set_function(lambda: (scheduler() or (0, 0))[1])

    def watch_clock(self, model: str, busy_seconds: Callable[[], float]) -> None:
        """Busy engine time: what attributed (billed + unbilled) seconds add up to."""
        self.registry.register(_BusyCollector(model, busy_seconds))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BusyCollector:
    def __init__(self, model: str, busy_seconds: Callable[[], float]):
        self.model = model
        self.busy_seconds = busy_seconds

    def collect(self):
        family = CounterMetricFamily("enclave_engine_busy_seconds", "Wall time with at least one generation in the engine", labels=["model"])
        family.add_metric([self.model], self.busy_seconds())
        yield family
