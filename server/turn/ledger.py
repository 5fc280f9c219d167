"""The turn ledger: admits, traces and settles each turn exactly once.

Opened by the dispatcher before anything of the turn runs (rails, memory summaries and
model calls are all charged to it): the trace starts and the key's budget is held. A
turn that fails before it runs is `abandon`ed; one that ran is settled when its events
end, however they end (`settling`). Settling is shielded from cancellation: a client
that hangs up cancels the response's task, and the turn must still be billed, recorded
and traced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from server.auth import Principal
from server.errors import EnclaveError
from server.telemetry.cost import Accounting, Charge, current_charge
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import Tracing, TurnTrace
from server.turn.state import Progress, Turn

log = logging.getLogger("server.turn")


@dataclass
class Admission:
    """What the ledger needs to know of a turn before it is prepared."""

    api: str  # "chat.completions" | "responses"
    model: str  # as the client asked (an alias stays an alias)
    max_new_tokens: int | None
    server_tools: bool  # several model calls: the hold covers them all


class TurnLedger:
    def __init__(self, model: str, metrics: Metrics, accounting: Accounting | None, trace: TurnTrace | None, charge: Charge, principal: Principal):
        self.model = model
        self.metrics = metrics
        self.accounting = accounting
        self.trace = trace
        self.charge = charge
        self.principal = principal
        self.started_at = time.time()
        self.cost_usd: float | None = None  # once settled

    @classmethod
    async def open(
        cls, ledgers: LedgerServices, principal: Principal, headers: Mapping[str, str], admission: Admission, max_model_len: int, max_tool_steps: int
    ) -> TurnLedger:
        """Start the turn's trace (current for this task from here on) and hold its
        budget; raises (InsufficientQuotaError) when the budget cannot cover it."""
        charge = Charge()
        current_charge.set(charge)
        trace = None
        if ledgers.tracing is not None:
            trace = ledgers.tracing.start_turn(
                admission.api, headers, enclave__tenant=principal.tenant, enclave__user=principal.user, enclave__key_id=principal.key_id, gen_ai__request__model=admission.model
            )
        ledger = cls(ledgers.model, ledgers.metrics, ledgers.accounting, trace, charge, principal)
        if ledgers.accounting is not None and principal.budget_usd is not None:
            new_tokens = admission.max_new_tokens if admission.max_new_tokens is not None else max_model_len
            steps = max_tool_steps if admission.server_tools else 1
            try:
                await asyncio.to_thread(ledgers.accounting.admit, principal.key_id, principal.budget_usd, charge, new_tokens * steps)
            except BaseException as exc:
                ledger.fail(exc)
                raise
        return ledger

    def move_to(self, ledgers: LedgerServices) -> None:
        """The turn runs on another model than the one it was admitted on (an agent's):
        it is recorded and priced as that model's. Its budget hold stays as taken."""
        self.model, self.metrics, self.accounting = ledgers.model, ledgers.metrics, ledgers.accounting

    @property
    def headers(self) -> dict[str, str]:
        return self.trace.headers if self.trace is not None else {}

    def fail(self, exc: BaseException, end: bool = True) -> None:
        if self.trace is not None:
            self.trace.fail(exc, end=end)
            if end and isinstance(exc, EnclaveError):
                exc.headers.update(self.trace.headers)  # the error response names its trace

    async def abandon(self, exc: BaseException) -> None:
        """A turn that failed before it ran: release its hold (billing what it used)."""
        charge, key_id = self.charge, self.principal.key_id
        if self.accounting is not None and charge.hold_id is not None and key_id is not None:
            usd = min(self.accounting.cost(charge.engine_seconds), charge.hold_usd)
            await asyncio.to_thread(self.accounting.budgets.settle, key_id, charge.hold_id, usd)
            charge.settled = True
        self.fail(exc)

    @asynccontextmanager
    async def settling(self, turn: Turn, progress: Progress) -> AsyncIterator[list[str]]:
        """Run a turn's events inside; it is settled on the way out with the outcome the
        body set (`outcome[0]`), "error" if it raised, else "client_disconnected"."""
        outcome = ["client_disconnected"]
        try:
            yield outcome
        except Exception as exc:
            outcome[0] = "error"
            self.fail(exc, end=False)
            raise
        finally:
            await self.settle(turn, progress, outcome[0])

    async def settle(self, turn: Turn, progress: Progress, outcome: str) -> None:
        """Settle once, whichever way the turn ends: its usage row, its budget hold, the
        cost metrics and the root span's totals."""
        if self.charge.settled:
            return
        self.charge.settled = True
        with anyio.CancelScope(shield=True):
            await self._settle(turn, progress, outcome)

    async def _settle(self, turn: Turn, progress: Progress, outcome: str) -> None:
        ctx = turn.context
        conversation = ctx.thread.conversation_id if ctx is not None and ctx.thread is not None else None
        p = self.principal
        usd = 0.0
        agent = turn.report.agent
        prompt_tokens, completion_tokens = progress.billed
        if agent is not None:
            agent.usage = agent.segments(progress.prompt_tokens, progress.completion_tokens, self.charge.engine_seconds)
        if self.accounting is not None:
            row = {
                "request_id": turn.request_id,
                "at": self.started_at,
                "tenant": p.tenant,
                "user": p.user,
                "key_id": p.key_id,
                "conversation_id": conversation,
                "model": self.model,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "duration_s": time.perf_counter() - turn.req.started,
                "trace_id": self.trace.trace_id if self.trace is not None else None,
            }
            try:
                usd = await asyncio.to_thread(self.accounting.settle, p.key_id, self.charge, row, agent.usage if agent is not None else None)
            except Exception:  # the answer was given; losing its usage row must not fail it
                log.exception("recording usage of %s failed", turn.request_id)
            self.metrics.cost.labels(model=self.model, tenant=p.tenant).inc(usd)
            self.metrics.engine_seconds.labels(model=self.model).inc(self.charge.engine_seconds)
            self.metrics.unbilled_seconds.labels(model=self.model).inc(self.charge.unbilled_seconds)
        self.cost_usd = usd
        if self.trace is not None:
            self.trace.set(
                gen_ai__response__id=turn.request_id,
                gen_ai__response__model=self.model,
                gen_ai__conversation__id=conversation,
                gen_ai__usage__input_tokens=prompt_tokens,
                gen_ai__usage__output_tokens=completion_tokens,
                gen_ai__agent__name=agent.agent.name if agent is not None else None,
                enclave__agent__asked=agent.asked if agent is not None else None,
                enclave__agent__handoffs=len([h for h in agent.handoffs if h.to]) if agent is not None else None,
                enclave__engine_seconds=round(self.charge.engine_seconds, 6),
                enclave__cost_usd=usd,
                enclave__budget_capped=True if self.charge.capped else None,
                enclave__outcome=outcome,
                enclave__guard__refused=True if turn.report.refusal is not None else None,
            )
            self.trace.end()

    def cost_info(self) -> dict[str, Any] | None:
        """The response's `cost` field, once settled."""
        if self.cost_usd is None:
            return None
        info: dict[str, Any] = {"engine_seconds": round(self.charge.engine_seconds, 6), "usd": self.cost_usd}
        if self.charge.capped:
            info["capped_by_budget"] = True
        return info


@dataclass
class LedgerServices:
    """One model's ledger collaborators."""

    model: str
    metrics: Metrics
    tracing: Tracing | None
    accounting: Accounting | None
