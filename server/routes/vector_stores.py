"""Vector stores: create, list, get, delete; add, list and remove files; search."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from server.auth import Principal, authorize
from server.protocol import ErrorResponse, OpenAIModel

router = APIRouter(prefix="/v1/vector_stores")

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


class CreateVectorStore(OpenAIModel):
    name: str | None = Field(None, max_length=256)
    file_ids: list[str] | None = None
    metadata: dict[str, str] | None = None


class AddFile(OpenAIModel):
    file_id: str


class SearchRequest(OpenAIModel):
    query: str | list[str]
    max_num_results: int = Field(10, ge=1, le=50)


def _kb(request: Request):
    return request.app.state.runtime.require_memory().knowledge


@router.post("", responses=_ERRORS, summary="Create a vector store (optionally with files).")
async def create_store(body: CreateVectorStore, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    kb = _kb(request)
    store = await asyncio.to_thread(kb.create_store, principal, body.name, body.metadata)
    for file_id in body.file_ids or []:
        await kb.add_file(principal, store["id"], file_id)
    return await asyncio.to_thread(kb.get_store, principal, store["id"]) if body.file_ids else store


@router.get("", summary="List the tenant's vector stores.")
async def list_stores(request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    rows = await asyncio.to_thread(_kb(request).list_stores, principal)
    return {"object": "list", "data": rows, "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None, "has_more": False}


@router.get("/{store_id}", responses=_ERRORS, summary="Get a vector store.")
async def get_store(store_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await asyncio.to_thread(_kb(request).get_store, principal, store_id)


@router.delete("/{store_id}", responses=_ERRORS, summary="Delete a vector store and its chunks (the files stay).")
async def delete_store(store_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await asyncio.to_thread(_kb(request).delete_store, principal, store_id)


@router.post("/{store_id}/files", responses=_ERRORS, summary="Add a file: it is chunked, embedded and indexed in the background (returned in_progress; poll it). Replaces a file of the same name.")
async def add_file(store_id: str, body: AddFile, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await _kb(request).add_file(principal, store_id, body.file_id)


@router.get("/{store_id}/files", responses=_ERRORS, summary="List a vector store's files.")
async def list_store_files(store_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    rows = await asyncio.to_thread(_kb(request).list_store_files, principal, store_id)
    return {"object": "list", "data": rows, "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None, "has_more": False}


@router.get("/{store_id}/files/{file_id}", responses=_ERRORS, summary="Get one file of a vector store.")
async def get_store_file(store_id: str, file_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await asyncio.to_thread(_kb(request).get_store_file, principal, store_id, file_id)


@router.delete("/{store_id}/files/{file_id}", responses=_ERRORS, summary="Remove a file and its chunks from a vector store.")
async def remove_store_file(store_id: str, file_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await asyncio.to_thread(_kb(request).remove_store_file, principal, store_id, file_id)


@router.post("/{store_id}/search", responses=_ERRORS, summary="Search a vector store: ranked chunks with scores, file ids and text.")
async def search_store(store_id: str, body: SearchRequest, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    query = body.query if isinstance(body.query, str) else " ".join(body.query)
    hits = await _kb(request).search(principal, [store_id], query, body.max_num_results)
    return {"object": "vector_store.search_results.page", "search_query": query, "data": [h.public() for h in hits], "has_more": False, "next_page": None}
