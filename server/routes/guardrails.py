"""GET /v1/guardrails/events: what the rails did over time, by stage, rail and action."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from server.auth import Principal, authorize

router = APIRouter(prefix="/v1/guardrails")


@router.get("/events", summary="Guardrail events of the tenant counted per time bucket, stage, rail and action.")
async def guardrail_events(
    request: Request,
    hours: float = Query(24.0, gt=0, le=24 * 90, description="how far back"),
    bucket_s: float = Query(3600.0, ge=60, le=86400 * 7, description="bucket width in seconds"),
    principal: Principal = Depends(authorize),
) -> dict[str, Any]:
    since = time.time() - hours * 3600
    rows = await asyncio.to_thread(request.app.state.runtime.guard_audit.summary, principal.tenant, since, bucket_s)
    return {"object": "list", "since": since, "bucket_s": bucket_s, "data": rows}
