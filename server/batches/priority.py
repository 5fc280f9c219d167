"""Interactive traffic, as the batch worker sees it: how many requests of the APIs a batch
runs are in flight now that are not a batch's own, and when the last one ended.

An ASGI middleware counts them, so every such request counts (streamed ones until their
last byte), and the batch worker asks `lines_allowed` before it starts a line: none
while an interactive request is in flight, one while they came moments ago (a client
sending one request after another keeps its latency), all of `concurrency` once the
server has been quiet for a while.
"""

from __future__ import annotations

import time

from server.batches.lines import ENDPOINTS
from server.in_process import CALLER

QUIET_S = 10.0  # no interactive request for this long: the batch may use its full concurrency


class InteractiveTraffic:
    def __init__(self) -> None:
        self.in_flight = 0
        self.last_ended = -QUIET_S  # monotonic; long ago

    def lines_allowed(self, concurrency: int) -> int:
        if self.in_flight > 0:
            return 0
        if time.monotonic() - self.last_ended < QUIET_S:
            return 1
        return concurrency


class InteractiveTrafficMiddleware:
    def __init__(self, app, traffic: InteractiveTraffic):
        self.app = app
        self.traffic = traffic

    async def __call__(self, scope, receive, send):
        caller = scope.get(CALLER)
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ENDPOINTS or (caller is not None and caller.origin == "batch"):
            return await self.app(scope, receive, send)
        self.traffic.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.traffic.in_flight -= 1
            self.traffic.last_ended = time.monotonic()
