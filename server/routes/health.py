"""Liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

router = APIRouter()


@router.get("/health", summary="Liveness: the process serves HTTP and loading has not failed.")
async def health(request: Request) -> JSONResponse:
    runtime = request.app.state.runtime
    if runtime.load_error:
        return JSONResponse({"status": "failed", "detail": runtime.load_error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="Readiness: the engine and the embedding model are loaded and the engine is alive.")
async def ready(request: Request) -> JSONResponse:
    runtime = request.app.state.runtime
    if runtime.ready:
        return JSONResponse({"status": "ready", "model": runtime.chat.model})
    if runtime.load_error:
        status = "failed"
    elif runtime.chat is not None and runtime.engine_state != "serving":
        status = f"engine_{runtime.engine_state}"  # engine_restarting (or engine_failed)
    else:
        status = "loading"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics.")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
