"""GET /v1/traces/{trace_id}: one turn's trace, from the local store (works air-gapped)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter, Depends, Request

from server.auth import Principal, authorize
from server.errors import NotFoundError, ServiceUnavailableError
from server.protocol import ErrorResponse
from server.telemetry.tracing import trace_object

router = APIRouter(prefix="/v1/traces")

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


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
