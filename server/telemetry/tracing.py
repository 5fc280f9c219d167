"""One OpenTelemetry trace per turn, following the GenAI semantic conventions.

The turn's root span is an `invoke_agent` span; under it sit a span per rail run
(`guardrails <stage>`, with one child per rail), the `retrieval` spans of knowledge
search and memory recall, the memory write, one `chat <model>` span per model call and
one `execute_tool <name>` span per tool execution.

Spans always go to SQL (`trace_spans`), so `GET /v1/traces/{id}` and `enclave traces
show` work in an air-gapped site; with an OTLP endpoint configured they are exported
there as well. Every string attribute passes the PII masker when it is set, and message
content (opt-in in the conventions) is never recorded: a trace holds ids, names, counts,
timings, verdicts and reasons.

The current span travels in a ContextVar rather than OpenTelemetry's attach/detach:
a turn's generators are resumed by whichever task reads the response, and a detach
from another context fails. Spans that enclose a `yield` (model calls) are therefore
opened with an explicit parent and never become current.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy import delete, insert, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database

from server.db import trace_spans
from server.telemetry.redaction import mask_pii

log = logging.getLogger(__name__)

AGENT_NAME = "enclave"
PROVIDER = "vllm"

_current: ContextVar[tuple[trace.Tracer, Span] | None] = ContextVar("enclave_current_span", default=None)
_NOOP = NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
_PROPAGATOR = TraceContextTextMapPropagator()


def _clean(value: Any) -> Any:
    """An attribute value as it may be stored: strings masked, None dropped."""
    if isinstance(value, str):
        return mask_pii(value)[0]
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value if v is not None]
    return value


def set_attributes(span: Span, **attributes: Any) -> None:
    """Attribute names use dots; keywords spell them with double underscores."""
    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(key.replace("__", "."), _clean(value))


def _fail(span: Span, exc: BaseException) -> None:
    # The type only: an exception's message can carry the user's words.
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    span.set_attribute("error.type", type(exc).__qualname__)


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Span]:
    """A child of the current span that is current inside the block (no `yield` of a
    generator may sit inside it). Outside a traced turn it records nothing."""
    cur = _current.get()
    if cur is None:
        yield _NOOP
        return
    tracer, parent = cur
    opened = tracer.start_span(name, context=trace.set_span_in_context(parent))
    set_attributes(opened, **attributes)
    token = _current.set((tracer, opened))
    try:
        yield opened
    except BaseException as exc:
        _fail(opened, exc)
        raise
    finally:
        _current.reset(token)
        opened.end()


def child(name: str, *, start_time: float | None = None, **attributes: Any) -> Span:
    """A child of the current span that the caller ends (it may stay open across a
    generator's yields; it never becomes current)."""
    cur = _current.get()
    if cur is None:
        return _NOOP
    tracer, parent = cur
    s = tracer.start_span(name, context=trace.set_span_in_context(parent), start_time=_ns(start_time))
    set_attributes(s, **attributes)
    return s


def record(name: str, start: float, end: float, **attributes: Any) -> None:
    """A span for work timed by someone else (NeMo reports each rail's start and end)."""
    s = child(name, start_time=start, **attributes)
    s.end(end_time=_ns(end))


def _ns(seconds: float | None) -> int | None:
    return int(seconds * 1e9) if seconds is not None else None


class TurnTrace:
    """The root span of one turn; ended once, whatever path the turn ends by."""

    def __init__(self, tracer: trace.Tracer, root: Span):
        self.tracer = tracer
        self.root = root
        self.trace_id = format(root.get_span_context().trace_id, "032x") if root.get_span_context().is_valid else ""
        self._ended = False

    def activate(self) -> None:
        """Make the root current in this task's context (a request's own task)."""
        _current.set((self.tracer, self.root))

    @property
    def headers(self) -> dict[str, str]:
        if not self.trace_id:
            return {}
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self.root))
        return {"x-trace-id": self.trace_id, **carrier}

    def set(self, **attributes: Any) -> None:
        set_attributes(self.root, **attributes)

    def fail(self, exc: BaseException, end: bool = True) -> None:
        _fail(self.root, exc)
        if end:
            self.end()

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.root.end()


class Tracing:
    """The app's tracer provider (its own, not the global one: several apps in one
    test process must not share exporters)."""

    def __init__(
        self, db: Database, otlp_endpoint: str | None = None, retention_days: float | None = None, service_name: str = "enclave", flush_interval_ms: int = 500
    ):
        self.store = TraceStore(db, retention_days)
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(SqlSpanExporter(self.store), schedule_delay_millis=flush_interval_ms))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
        self.tracer = self.provider.get_tracer("enclave")

    def start_turn(self, operation: str, headers: Mapping[str, str] | None = None, **attributes: Any) -> TurnTrace:
        """The root span of a turn, made current for the calling task. A W3C
        `traceparent` from the client makes the turn part of the client's trace."""
        parent = _PROPAGATOR.extract(carrier=dict(headers)) if headers else None
        root = self.tracer.start_span(f"invoke_agent {AGENT_NAME}", context=parent, kind=SpanKind.SERVER)
        set_attributes(
            root,
            gen_ai__operation__name="invoke_agent",
            gen_ai__agent__name=AGENT_NAME,
            gen_ai__provider__name=PROVIDER,
            enclave__api=operation,
            **attributes,
        )
        turn = TurnTrace(self.tracer, root)
        turn.activate()
        return turn

    def spans(self, trace_id: str, tenant: str | None = None) -> list[dict[str, Any]]:
        """A trace's spans as stored; a turn that just ended may still sit in the
        exporter's batch, so it is flushed first. Blocking (SQL): run it in a thread."""
        self.flush()
        return self.store.get(trace_id, tenant)

    def flush(self) -> None:
        self.provider.force_flush(timeout_millis=10_000)

    def shutdown(self) -> None:
        self.provider.shutdown()


class SqlSpanExporter(SpanExporter):
    def __init__(self, store: TraceStore):
        self.store = store

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.store.write(spans)
        except Exception:  # telemetry must never take the server down
            log.exception("writing %d spans failed", len(spans))
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


class TraceStore:
    """Spans in SQL: written by the exporter thread, read by the API and the CLI. Spans
    older than the retention are deleted as new ones arrive (at most every few minutes)."""

    PRUNE_EVERY_S = 300.0

    def __init__(self, db: Database, retention_days: float | None = None):
        self.db = db
        self.retention_s = retention_days * 86400 if retention_days else None
        self._pruned_at = 0.0

    def prune(self, now: float | None = None) -> int:
        if self.retention_s is None:
            return 0
        now = time.time() if now is None else now
        self._pruned_at = now
        with self.db.begin() as conn:
            return conn.execute(delete(trace_spans).where(trace_spans.c.start_time < now - self.retention_s)).rowcount or 0

    def write(self, spans: Sequence[ReadableSpan]) -> None:
        rows = []
        for s in spans:
            attrs = dict(s.attributes or {})
            rows.append(
                {
                    "trace_id": _hex(s.context.trace_id, 32),
                    "span_id": _hex(s.context.span_id, 16),
                    "parent_id": _hex(s.parent.span_id, 16) if s.parent is not None else None,
                    "name": s.name,
                    "kind": s.kind.name.lower(),
                    "start_time": (s.start_time or 0) / 1e9,
                    "end_time": (s.end_time or 0) / 1e9,
                    "status": s.status.status_code.name.lower(),
                    "tenant": attrs.get("enclave.tenant"),
                    "user": attrs.get("enclave.user"),
                    "attributes": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}, ensure_ascii=False),
                }
            )
        if rows:
            with self.db.begin() as conn:
                conn.execute(insert(trace_spans), rows)
        if time.time() - self._pruned_at > self.PRUNE_EVERY_S:
            self.prune()

    @staticmethod
    def forget(conn: Connection, tenant: str, user: str) -> dict[str, int]:
        """Traces go whole: the root span names the user; its children are the turn's."""
        ids = select(trace_spans.c.trace_id).where(trace_spans.c.tenant == tenant, trace_spans.c.user == user).scalar_subquery()
        return {"trace_spans": conn.execute(delete(trace_spans).where(trace_spans.c.trace_id.in_(ids))).rowcount or 0}

    def turns(self, tenant: str | None, q: str | None = None, before: float | None = None, limit: int = 50, trace_id: str | None = None) -> list[dict[str, Any]]:
        """Turns newest first, from their root spans (the only spans naming a tenant):
        `q` matches the user, the trace id or any (masked) attribute; `before` pages;
        `trace_id` is one turn (by the index)."""
        c = trace_spans.c
        query = select(trace_spans).where(c.tenant.is_not(None))
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        if trace_id is not None:
            query = query.where(c.trace_id == trace_id)
        if before is not None:
            query = query.where(c.start_time < before)
        if q:
            pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            query = query.where(or_(c.user.like(pattern, escape="\\"), c.trace_id.like(pattern, escape="\\"), c.attributes.like(pattern, escape="\\")))
        with self.db.connect() as conn:
            rows = conn.execute(query.order_by(c.start_time.desc()).limit(limit)).mappings().all()
        return [turn_summary(_span_out(r), r["tenant"], r["user"]) for r in rows]

    def get(self, trace_id: str, tenant: str | None = None) -> list[dict[str, Any]]:
        """The trace's spans in start order; empty when it does not exist or its root
        belongs to another tenant (None: any tenant, for the operator's CLI)."""
        with self.db.connect() as conn:
            rows = conn.execute(select(trace_spans).where(trace_spans.c.trace_id == trace_id).order_by(trace_spans.c.start_time)).mappings().all()
        spans = [_span_out(r) for r in rows]
        if tenant is not None and not any(s["attributes"].get("enclave.tenant") == tenant for s in spans):
            return []
        return spans


def _span_out(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "trace_id": r["trace_id"],
        "span_id": r["span_id"],
        "parent_id": r["parent_id"],
        "name": r["name"],
        "kind": r["kind"],
        "start_time": r["start_time"],
        "end_time": r["end_time"],
        "duration_ms": round((r["end_time"] - r["start_time"]) * 1000, 3),
        "status": r["status"],
        "attributes": json.loads(r["attributes"] or "{}"),
    }


def turn_summary(root: dict[str, Any], tenant: str, user: str) -> dict[str, Any]:
    """One line of the turns list: who, which model and route, how it ended, its cost."""
    a = root["attributes"]
    return {
        "object": "trace.turn",
        "trace_id": root["trace_id"],
        "request_id": a.get("gen_ai.response.id"),
        "start_time": root["start_time"],
        "duration_ms": root["duration_ms"],
        "tenant": tenant,
        "user": user,
        "api": a.get("enclave.api"),
        "model": a.get("gen_ai.response.model") or a.get("gen_ai.request.model"),
        "agent": a.get("gen_ai.agent.name") if a.get("enclave.agent.asked") else None,
        "route": a.get("enclave.route.reason"),
        "outcome": a.get("enclave.outcome") or root["status"],
        "refused": bool(a.get("enclave.guard.refused")),
        "cost_usd": a.get("enclave.cost_usd"),
        "input_tokens": a.get("gen_ai.usage.input_tokens"),
        "output_tokens": a.get("gen_ai.usage.output_tokens"),
    }


def trace_object(trace_id: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    """The API's shape of one trace."""
    root = next((s for s in spans if s["parent_id"] is None or s["name"].startswith("invoke_agent")), spans[0])
    return {
        "object": "trace",
        "id": trace_id,
        "name": root["name"],
        "start_time": root["start_time"],
        "duration_ms": root["duration_ms"],
        "spans": spans,
    }


def render_tree(spans: list[dict[str, Any]]) -> str:
    """A trace as an indented tree with each span's duration and key attributes."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in spans:
        parent = s["parent_id"] if s["parent_id"] in ids else None
        children.setdefault(parent, []).append(s)
    shown = (
        "gen_ai.request.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.response.time_to_first_chunk",
        "enclave.tokens_per_second",
        "gen_ai.response.finish_reasons",
        "gen_ai.tool.name",
        "enclave.tool.outcome",
        "gen_ai.data_source.id",
        "enclave.retrieval.results",
        "enclave.guard.verdict",
        "enclave.guard.reason",
        "enclave.cost_usd",
        "error.type",
    )
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in children.get(parent, []):
            attrs = s["attributes"]
            extra = " ".join(f"{k.rsplit('.', 1)[-1] if k != 'gen_ai.request.model' else 'model'}={attrs[k]}" for k in shown if k in attrs)
            status = "" if s["status"] != "error" else " ERROR"
            lines.append(f"{'  ' * depth}{s['name']}  {s['duration_ms']:.1f} ms{status}{'  ' + extra if extra else ''}")
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)
