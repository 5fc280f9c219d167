"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers and slows streaming)."""

from __future__ import annotations

import json
import math
import time

from server import deadlines
from server.errors import EnclaveError, InvalidRequestError, RequestTooLargeError
from server.telemetry.metrics import Metrics


async def _send_error(send, exc: EnclaveError) -> None:
    body = json.dumps(exc.to_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse request bodies over the cap with 413, judged by header or by bytes read.

    The body is read here, up to the cap, and replayed to the app: a limit enforced
    inside the app's own body parsing would surface as a generic parse error.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        too_large = RequestTooLargeError(f"Request body exceeds the limit of {self.max_bytes} bytes.")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, too_large)
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _send_error(send, too_large)
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as usual

        await self.app(scope, replay, send)


class RequestMetricsMiddleware:
    """Count requests by method, route template (not raw path: bounded labels) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(method=scope["method"], route=path, status=str(status)).inc()


class DeadlineMiddleware:
    """Every request runs under a server-side deadline (server/deadlines.py): the
    server's, or a shorter one the client asks for in X-Enclave-Timeout."""

    def __init__(self, app, timeout_s: float, stall_s: float):
        self.app = app
        self.timeout_s = timeout_s
        self.stall_s = stall_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timeout = self.timeout_s
        raw = dict(scope["headers"]).get(deadlines.HEADER.encode())
        if raw is not None:
            try:
                asked = float(raw.decode("latin-1"))
            except ValueError:
                asked = math.nan
            if not (0 < asked <= self.timeout_s):
                return await _send_error(
                    send,
                    InvalidRequestError(
                        f"X-Enclave-Timeout must be a number of seconds above 0 and at most {self.timeout_s:g} (the server's limit).",
                        param="X-Enclave-Timeout",
                        code="invalid_timeout",
                    ),
                )
            timeout = asked
        token = deadlines.current.set(deadlines.Deadline(time.monotonic() + timeout, min(self.stall_s, timeout)))
        try:
            await self.app(scope, receive, send)
        finally:
            deadlines.current.reset(token)
