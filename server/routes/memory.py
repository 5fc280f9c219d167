"""GET /v1/memory, DELETE /v1/memory/{id}, DELETE /v1/memory?user=… (forget a user).

A key with the `memory` scope sees and deletes its own user's memory; one with
`memory:admin` may name any user of its tenant. Forgetting a user removes their
memories from Chroma and every row that names them from SQL (conversations, turns,
tool audit, actions).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from server.auth import Principal, authorize
from server.errors import NotFoundError, PermissionDeniedError
from server.protocol import ErrorResponse
from server.scopes import MEMORY_ADMIN

router = APIRouter(prefix="/v1/memory")

_ERRORS = {403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


def _subject(principal: Principal, user: str | None) -> str:
    if user is None or user == principal.user:
        return principal.user
    if not principal.allows(MEMORY_ADMIN):
        raise PermissionDeniedError(f"addressing another user's memory needs the '{MEMORY_ADMIN}' scope", param="user")
    return user


@router.get("", responses=_ERRORS, summary="List a user's memories (yours by default).")
async def list_memory(request: Request, user: str | None = Query(None), limit: int = Query(100, ge=1, le=1000), principal: Principal = Depends(authorize)) -> dict[str, Any]:
    memory = request.app.state.runtime.require_memory()
    rows = await asyncio.to_thread(memory.episodic.list, principal.tenant, _subject(principal, user), limit)
    return {"object": "list", "data": rows}


@router.delete("/{memory_id}", responses=_ERRORS, summary="Delete one memory.")
async def delete_memory(memory_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    memory = request.app.state.runtime.require_memory()
    owner = await asyncio.to_thread(memory.episodic.owner, principal.tenant, memory_id)
    if owner is None or (owner != principal.user and not principal.allows(MEMORY_ADMIN)):
        raise NotFoundError(f"No memory found with id '{memory_id}'.", param="memory_id")
    await asyncio.to_thread(memory.episodic.delete, principal.tenant, memory_id)
    return {"id": memory_id, "object": "memory.deleted", "deleted": True}


@router.delete("", responses=_ERRORS, summary="Forget a user entirely: memories, conversations, tool audit, actions and traces.")
async def forget_user(request: Request, user: str = Query(...), principal: Principal = Depends(authorize)) -> dict[str, Any]:
    forgetter = request.app.state.runtime.require_forgetter()
    subject = _subject(principal, user)
    return {"object": "memory.forgotten", "user": subject, "deleted": await forgetter.forget(principal.tenant, subject)}
