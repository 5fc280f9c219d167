"""GET /v1/traces: the tenant's turns, searchable; GET /v1/traces/{trace_id}: one turn's
trace. Both from the local store (works air-gapped)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from server.auth import Principal, authorize
from server.errors import NotFoundError, ServiceUnavailableError
from server.protocol import ErrorResponse
from server.telemetry.tracing import trace_object

router = APIRouter(prefix="/v1/traces")

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


@router.get("", summary="List the tenant's turns, newest first: who, model, route, outcome, cost and the rails that acted.")
async def list_turns(
    request: Request,
    q: str | None = Query(None, max_length=200, description="matches the user, the trace id or any (masked) attribute"),
    trace_id: str | None = Query(None, max_length=32, description="one turn, by its trace id"),
    outcome: str | None = Query(None, max_length=64),
    rail: str | None = Query(None, max_length=128, description="only turns in which this rail acted"),
    before: float | None = Query(None, description="Unix seconds: turns that started earlier (paging)"),
    limit: int = Query(50, ge=1, le=500),
    principal: Principal = Depends(authorize),
) -> dict[str, Any]:
    runtime = request.app.state.runtime
    tracing = runtime.tracing
    if tracing is None:
        raise ServiceUnavailableError("tracing is not enabled on this server", code="tracing_disabled")

    def load() -> list[dict[str, Any]]:
        tracing.flush()
        # Filters on what only the attributes or the audit know narrow a wider window.
        wide = limit * 5 if (outcome or rail) else limit
        turns = tracing.store.turns(principal.tenant, q, before, wide, trace_id.lower() if trace_id else None)
        fired = runtime.guard_audit.fired([t["request_id"] for t in turns if t["request_id"]])
        for t in turns:
            t["rails"] = fired.get(t["request_id"], [])
        turns = [t for t in turns if (not outcome or t["outcome"] == outcome) and (not rail or any(r["rail"] == rail for r in t["rails"]))]
        return turns[:limit]

    turns = await asyncio.to_thread(load)
    return {"object": "list", "data": turns, "has_more": len(turns) == limit}


@router.get("/{trace_id}", responses={404: {"model": ErrorResponse}}, summary="Get a trace: its spans with timings and attributes.")
async def get_trace(trace_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    tracing = request.app.state.runtime.tracing
    if tracing is None:
        raise ServiceUnavailableError("tracing is not enabled on this server", code="tracing_disabled")
    trace_id = trace_id.lower()
    if not _TRACE_ID.match(trace_id):
        raise NotFoundError(f"No trace found with id '{trace_id}'.", param="trace_id")
    spans = await asyncio.to_thread(tracing.spans, trace_id, principal.tenant)
    if not spans:
        raise NotFoundError(f"No trace found with id '{trace_id}'.", param="trace_id")
    return trace_object(trace_id, spans)
