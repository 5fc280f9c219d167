"""GET /v1/usage: tokens, engine time and cost per request, conversation, key or tenant."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from server.auth import Principal, authorize
from server.errors import InvalidRequestError, ServiceUnavailableError
from server.protocol import ErrorResponse
from server.telemetry.cost import GROUPS

router = APIRouter(prefix="/v1")


@router.get("/usage", responses={400: {"model": ErrorResponse}}, summary="Usage and cost, grouped by request, conversation, key, tenant, user, model or agent.")
async def get_usage(
    request: Request,
    group_by: str = Query("key"),
    start_time: float | None = Query(None, description="Unix seconds, inclusive"),
    end_time: float | None = Query(None, description="Unix seconds, exclusive"),
    limit: int = Query(100, ge=1, le=10_000),
    principal: Principal = Depends(authorize),
) -> dict[str, Any]:
    if group_by not in GROUPS:
        raise InvalidRequestError(f"group_by must be one of {', '.join(GROUPS)}", param="group_by", code="invalid_value")
    accounting = request.app.state.runtime.accounting
    if accounting is None:
        raise ServiceUnavailableError("the model is still loading; retry shortly")
    # A key sees its own tenant; "usage:admin" sees every tenant.
    tenant = None if principal.allows("usage:admin") else principal.tenant
    out = await asyncio.to_thread(accounting.ledger.summary, group_by, tenant, start_time, end_time, limit)
    if principal.key_id is not None and principal.budget_usd is not None:
        state = await asyncio.to_thread(accounting.budgets.status, principal.key_id)
        out["budget"] = {"key_id": principal.key_id, "limit_usd": principal.budget_usd, **state}
    out["cost_per_hour"] = accounting.cost_per_hour
    # The measured pace that sizes budget holds (a hold covers twice max_tokens at it).
    out["seconds_per_token"] = accounting.seconds_per_token
    return out
