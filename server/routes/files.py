"""POST /v1/files (multipart upload), GET /v1/files[/{id}[/content]], DELETE /v1/files/{id}."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from server.auth import Principal, authorize
from server.protocol import ErrorResponse

router = APIRouter(prefix="/v1/files")

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


def _kb(request: Request):
    return request.app.state.runtime.require_memory().knowledge


@router.post("", responses=_ERRORS, summary="Upload a file (Markdown, text, HTML or PDF for vector stores).")
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form("assistants"), principal: Principal = Depends(authorize)) -> dict[str, Any]:
    data = await file.read()
    return await asyncio.to_thread(_kb(request).create_file, principal, file.filename or "", data, purpose)


@router.get("", summary="List the tenant's files.")
async def list_files(request: Request, purpose: str | None = Query(None), principal: Principal = Depends(authorize)) -> dict[str, Any]:
    rows = await asyncio.to_thread(_kb(request).list_files, principal, purpose)
    return {"object": "list", "data": rows, "has_more": False}


@router.get("/{file_id}", responses=_ERRORS, summary="Get a file's metadata.")
async def get_file(file_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await asyncio.to_thread(_kb(request).get_file, principal, file_id)


@router.get("/{file_id}/content", responses=_ERRORS, summary="Download a file's content.")
async def file_content(file_id: str, request: Request, principal: Principal = Depends(authorize)) -> Response:
    filename, data = await asyncio.to_thread(_kb(request).file_content, principal, file_id)
    return Response(data, media_type="application/octet-stream", headers=attachment_headers(filename))


def download_name(filename: str) -> str:
    """A filename as given by a client, made safe to offer back: its last path part,
    without control or bidirectional-override characters, never hidden or empty."""
    name = re.split(r"[/\\]", filename)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".")
    return name or "download"


def attachment_headers(filename: str) -> dict[str, str]:
    """Always a download, never rendered in place (an uploaded .html stays inert), with an
    ASCII fallback name and the UTF-8 one of RFC 6266 / RFC 5987."""
    name = download_name(filename)
    ascii_name = re.sub(r"[^A-Za-z0-9._()+ -]", "_", name)
    return {
        "Content-Disposition": f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}",
        "X-Content-Type-Options": "nosniff",
    }


@router.delete("/{file_id}", responses=_ERRORS, summary="Delete a file and its chunks in every vector store.")
async def delete_file(file_id: str, request: Request, principal: Principal = Depends(authorize)) -> dict[str, Any]:
    return await asyncio.to_thread(_kb(request).delete_file, principal, file_id)
