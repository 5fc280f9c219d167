"""POST /v1/batches, GET /v1/batches[/{id}], POST /v1/batches/{id}/cancel (OpenAI's Batch API)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict

from server.auth import Principal, authorize
from server.protocol import ErrorResponse

router = APIRouter(prefix="/v1/batches")

_ERRORS = {400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None


def _store(request: Request):
    return request.app.state.runtime.require_batches()


@router.post("", responses=_ERRORS, summary="Create a batch from an uploaded JSONL file (purpose 'batch'); it runs in the background.")
async def create_batch(body: BatchRequest, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    store, worker = _store(request)
    batch = await asyncio.to_thread(store.create, principal, body.input_file_id, body.endpoint, body.completion_window, body.metadata)
    worker.submit()
    return batch


@router.get("", summary="List the caller's batches, newest first.")
async def list_batches(request: Request, after: str | None = Query(None), limit: int = Query(20, ge=1, le=100), principal: Principal = Depends(authorize)) -> dict[str, Any]:
    store, _ = _store(request)
    return await asyncio.to_thread(store.list, principal, after, limit)


@router.get("/{batch_id}", responses=_ERRORS, summary="Get a batch: its status, counts, usage and files.")
async def get_batch(batch_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    store, _ = _store(request)
    return await asyncio.to_thread(store.get, principal, batch_id)


@router.post("/{batch_id}/cancel", responses=_ERRORS, summary="Cancel a batch: lines running finish, no other starts.")
async def cancel_batch(batch_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    store, worker = _store(request)
    batch = await asyncio.to_thread(store.cancel, principal, batch_id)
    worker.submit()
    return batch
