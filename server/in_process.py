"""Requests this server sends to itself, as one of its callers: the batch worker runs each
line as the batch's creator, the console asks the API as the signed-in key.

They go through the app's whole stack (middleware, `authorize` and its scopes, the
routes' own checks) over an in-process ASGI transport; only the network and the bearer
header are skipped. Who is calling rides in the ASGI scope under `CALLER`, which only
code in this process can set: a network client's request never has it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from server.auth import IN_PROCESS_CALLER as CALLER
from server.auth import Principal


@dataclass(frozen=True)
class Caller:
    principal: Principal
    origin: str  # "batch" | "console": batch lines do not count as interactive traffic


def client(app: Any, caller: Callable[[], Caller]) -> httpx.AsyncClient:
    """A client of `app` whose every request is `caller()`'s, asked as it is sent."""

    async def asgi(scope, receive, send):
        await app({**scope, CALLER: caller()}, receive, send)

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://enclave.internal", timeout=None)
