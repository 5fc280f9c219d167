"""One guard ledger per turn: what every rail changed or stopped, audited once.

Stages add their verdicts' events as they go; the retrieval rails' come from context
assembly and are reported after the rest (their order in responses and the audit).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from server.guard import Guard, GuardEvent

log = logging.getLogger("server.turn")


class GuardLedger:
    def __init__(self) -> None:
        self._events: list[GuardEvent] = []
        self._retrieval: list[GuardEvent] = []

    def add(self, events: list[GuardEvent]) -> None:
        self._events += events

    def retrieval(self, events: list[GuardEvent]) -> None:
        """The retrieval rails' events of the (last) context assembly."""
        self._retrieval = events

    def all(self) -> list[GuardEvent]:
        return self._events + self._retrieval

    def public(self) -> list[dict[str, Any]]:
        return [e.public() for e in self.all()]

    async def audit(self, guard: Guard, request_id: str, tenant: str, user: str) -> None:
        events = self.all()
        for e in events:
            log.info("guardrails %s %s %s: %s (%s)", request_id, e.stage, e.action, e.rail, e.reason)
        if events and guard.audit is not None:
            await asyncio.to_thread(guard.audit.write, request_id, tenant, user, events)
