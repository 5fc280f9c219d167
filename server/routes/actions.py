"""Pending actions of destructive tools: look at them, approve (operator) or cancel."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from server.auth import Principal, authorize
from server.protocol import ErrorResponse
from server.toolcalls.executor import public_action

router = APIRouter(prefix="/v1/actions")

_ERRORS = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}


@router.get("", summary="List the tenant's actions, newest first.")
async def list_actions(request: Request, status: Literal["pending", "executing", "succeeded", "failed", "cancelled", "expired"] | None = Query(None), principal: Principal = Depends(authorize)) -> dict[str, Any]:
    executor = request.app.state.runtime.require_executor()
    rows = await asyncio.to_thread(executor.list_actions, principal, status)
    return {"object": "list", "data": [public_action(r) for r in rows]}


@router.get("/{action_id}", responses=_ERRORS, summary="Get one action.")
async def get_action(action_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    executor = request.app.state.runtime.require_executor()
    return public_action(await asyncio.to_thread(executor.get_action, action_id, principal, operator=True))


@router.post("/{action_id}/approve", responses=_ERRORS, summary="Approve a pending action; it runs exactly once.")
async def approve_action(action_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    executor = request.app.state.runtime.require_executor()
    return public_action(await executor.approve(action_id, principal, operator=True, request_id=f"approve-{action_id}"))


@router.post("/{action_id}/cancel", responses=_ERRORS, summary="Cancel a pending action.")
async def cancel_action(action_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    executor = request.app.state.runtime.require_executor()
    return public_action(await asyncio.to_thread(executor.cancel, action_id, principal, operator=True))
