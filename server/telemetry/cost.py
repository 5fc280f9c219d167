"""Cost accounting for local inference: engine time attributed to requests, priced at
the model profile's hourly hardware cost; usage per request, conversation, key and
tenant; per-key budgets that admit a request only if it cannot overspend.

Attribution is processor sharing: while n generations are in the engine, each is
charged 1/n of every second. A virtual clock that advances at 1/n per wall second
gives each generation its share in O(1) (the fair-queuing trick): its share is the
clock's advance between its start and its end. Shares add up to the time the engine
was busy, exactly, however requests overlap.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError

from server.db import agent_usage, budget_holds, key_budgets, usage_records
from server.errors import InsufficientQuotaError

FORGOTTEN = "[forgotten]"  # who a forgotten user's usage rows name

SECONDS_PER_HOUR = 3600.0
# Engine seconds per generated token assumed for budget holds until a model is measured.
DEFAULT_SECONDS_PER_TOKEN = 0.25


class EngineClock:
    """Engine time shared among the generations in it. Used from the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._active = 0
        self._virtual = 0.0
        self._last = clock()
        self.busy_seconds = 0.0  # wall time with at least one generation in the engine

    def _advance(self) -> None:
        now = self._clock()
        if self._active:
            self._virtual += (now - self._last) / self._active
            self.busy_seconds += now - self._last
        self._last = now

    def enter(self) -> float:
        """A generation starts; the mark to pass to share()/leave()."""
        self._advance()
        self._active += 1
        return self._virtual

    def share(self, mark: float) -> float:
        """Engine seconds charged to the generation since its mark."""
        self._advance()
        return self._virtual - mark

    def leave(self, mark: float) -> float:
        self._advance()
        self._active -= 1
        return self._virtual - mark


@dataclass
class Charge:
    """What one turn used. `engine_seconds` is billed; time past the turn's ceiling
    (at most one engine step before the generation stops) is `unbilled_seconds`."""

    engine_seconds: float = 0.0
    unbilled_seconds: float = 0.0
    ceiling_seconds: float | None = None  # from the key's budget hold
    hold_usd: float = 0.0
    hold_id: str | None = None
    capped: bool = False
    settled: bool = False

    def add(self, seconds: float) -> None:
        if self.ceiling_seconds is not None and self.engine_seconds + seconds > self.ceiling_seconds:
            billed = max(self.ceiling_seconds - self.engine_seconds, 0.0)
            self.unbilled_seconds += seconds - billed
            seconds = billed
        self.engine_seconds += seconds

    def over(self, running: float) -> bool:
        return self.ceiling_seconds is not None and self.engine_seconds + running >= self.ceiling_seconds


# The charge of the turn this task serves (set by the route, read by the engine wrapper).
current_charge: ContextVar[Charge | None] = ContextVar("enclave_current_charge", default=None)


def cost_usd(engine_seconds: float, cost_per_hour: float) -> float:
    return engine_seconds * cost_per_hour / SECONDS_PER_HOUR


class Budgets:
    """Per-key spend and holds in SQL (see db.key_budgets). Blocking: call in a thread."""

    # Longer than any turn runs; a hold older than this belonged to a process that died.
    HOLD_TTL_S = 3600.0

    def __init__(self, db: Database):
        self.db = db

    def _ensure(self, key_id: str) -> None:
        try:
            with self.db.begin() as conn:
                conn.execute(insert(key_budgets).values(key_id=key_id, spent_usd=0.0))
        except IntegrityError:
            pass  # it exists

    def reserve(self, key_id: str, limit_usd: float, hold_usd: float) -> str | None:
        """The id of a new hold, or None when the budget cannot cover it."""
        self._ensure(key_id)
        now = time.time()
        b, h = key_budgets.c, budget_holds.c
        with self.db.begin() as conn:
            # The no-op update locks the key's row (PostgreSQL) or the database (SQLite)
            # until commit: the check and the insert below cannot interleave with another's.
            conn.execute(update(key_budgets).where(b.key_id == key_id).values(spent_usd=b.spent_usd))
            conn.execute(delete(budget_holds).where(h.key_id == key_id, h.expires_at < now))
            spent = conn.execute(select(b.spent_usd).where(b.key_id == key_id)).scalar_one()
            held = conn.execute(select(func.coalesce(func.sum(h.usd), 0.0)).where(h.key_id == key_id)).scalar_one()
            if spent + held + hold_usd > limit_usd:
                return None
            hold_id = "hold_" + secrets.token_hex(8)
            conn.execute(insert(budget_holds).values(id=hold_id, key_id=key_id, usd=hold_usd, expires_at=now + self.HOLD_TTL_S))
        return hold_id

    def settle(self, key_id: str, hold_id: str, spent_usd: float) -> None:
        """Release the hold and add what the request spent."""
        b = key_budgets.c
        with self.db.begin() as conn:
            conn.execute(delete(budget_holds).where(budget_holds.c.id == hold_id))
            conn.execute(update(key_budgets).where(b.key_id == key_id).values(spent_usd=b.spent_usd + spent_usd))

    def status(self, key_id: str) -> dict[str, float]:
        h = budget_holds.c
        with self.db.connect() as conn:
            spent = conn.execute(select(key_budgets.c.spent_usd).where(key_budgets.c.key_id == key_id)).scalar_one_or_none()
            held = conn.execute(select(func.coalesce(func.sum(h.usd), 0.0)).where(h.key_id == key_id, h.expires_at >= time.time())).scalar_one()
        return {"spent_usd": spent or 0.0, "held_usd": float(held)}


_GROUPS = {
    "request": usage_records.c.request_id,
    "conversation": usage_records.c.conversation_id,
    "key": usage_records.c.key_id,
    "tenant": usage_records.c.tenant,
    "user": usage_records.c.user,
    "model": usage_records.c.model,
}
# Per agent, from the agent rows: a turn that two agents worked on counts for each.
GROUPS = (*_GROUPS, "agent")


class UsageLedger:
    """One row per turn, and one per agent of a turn run by agents; GET /v1/usage sums
    them by request, conversation, key, tenant, user, model or agent."""

    def __init__(self, db: Database):
        self.db = db

    def record(self, row: dict[str, Any], agents: list[dict[str, Any]] | None = None) -> None:
        """The turn's row and its agents' rows (their `agent`, tokens, engine seconds
        and cost; the rest is the turn's), in one transaction."""
        shared = {k: row[k] for k in ("request_id", "at", "tenant", "user", "key_id", "conversation_id")}
        with self.db.begin() as conn:
            conn.execute(insert(usage_records).values(**row))
            if agents:
                conn.execute(insert(agent_usage), [{**shared, **a} for a in agents])

    def last_turn(self, conversation_id: str) -> tuple[str, str] | None:
        """(request id, model) of a conversation's latest turn."""
        query = select(usage_records.c.request_id, usage_records.c.model).where(usage_records.c.conversation_id == conversation_id).order_by(usage_records.c.at.desc()).limit(1)
        with self.db.connect() as conn:
            row = conn.execute(query).first()
        return (row.request_id, row.model) if row is not None else None

    @staticmethod
    def forget(conn: Connection, tenant: str, user: str) -> dict[str, int]:
        """Usage stays (spend per key and tenant must still add up) but no longer names the user."""
        for table in (usage_records, agent_usage):
            conn.execute(update(table).where(table.c.tenant == tenant, table.c.user == user).values(user=FORGOTTEN))
        return {}

    def summary(self, group_by: str, tenant: str | None, start: float | None = None, end: float | None = None, limit: int = 100) -> dict[str, Any]:
        u = (agent_usage if group_by == "agent" else usage_records).c
        where = []
        if tenant is not None:
            where.append(u.tenant == tenant)
        if start is not None:
            where.append(u.at >= start)
        if end is not None:
            where.append(u.at < end)
        sums = (
            func.count().label("requests"),
            func.sum(u.prompt_tokens).label("prompt_tokens"),
            func.sum(u.completion_tokens).label("completion_tokens"),
            func.sum(u.engine_seconds).label("engine_seconds"),
            func.sum(u.cost_usd).label("cost_usd"),
        )
        key = u.agent if group_by == "agent" else _GROUPS[group_by]
        # A user name is only unique within its tenant: users are keyed by both.
        grouped = (u.tenant, key) if group_by == "user" else (key,)
        with self.db.connect() as conn:
            rows = conn.execute(select(*grouped[:-1], key.label("id"), *sums).where(*where).group_by(*grouped).order_by(func.sum(u.cost_usd).desc()).limit(limit)).mappings().all()
            total = conn.execute(select(*sums).where(*where)).mappings().one()
        return {
            "object": "list",
            "group_by": group_by,
            "data": [
                {"object": "usage.bucket", **({"tenant_id": r["tenant"]} if group_by == "user" else {}), group_by + "_id": r["id"], **_numbers(r)}
                for r in rows
            ],
            "total": _numbers(total),
        }


def _numbers(r: Any) -> dict[str, Any]:
    return {
        "requests": int(r["requests"] or 0),
        "prompt_tokens": int(r["prompt_tokens"] or 0),
        "completion_tokens": int(r["completion_tokens"] or 0),
        "engine_seconds": float(r["engine_seconds"] or 0.0),
        "cost_usd": float(r["cost_usd"] or 0.0),
    }


class Accounting:
    """Admission against budgets, and the settling of each turn: its usage row and its
    budget hold replaced by what it spent."""

    # A hold covers twice the expected engine time: the pace varies with load.
    MARGIN = 2.0

    def __init__(self, db: Database, cost_per_hour: float, seconds_per_token: float = DEFAULT_SECONDS_PER_TOKEN):
        self.budgets = Budgets(db)
        self.ledger = UsageLedger(db)
        self.cost_per_hour = cost_per_hour
        # The profile's estimate until measured; then a moving average of what turns used.
        self.seconds_per_token = seconds_per_token

    def cost(self, engine_seconds: float) -> float:
        return cost_usd(engine_seconds, self.cost_per_hour)

    def hold(self, max_new_tokens: int) -> tuple[float, float]:
        """(engine seconds, USD) a request of up to `max_new_tokens` may use."""
        seconds = self.MARGIN * self.seconds_per_token * max(max_new_tokens, 1)
        return seconds, cost_usd(seconds, self.cost_per_hour)

    def admit(self, key_id: str | None, budget_usd: float | None, charge: Charge, max_new_tokens: int) -> None:
        """Reserve the hold, or raise InsufficientQuotaError. Blocking (SQL): run in a thread."""
        if budget_usd is None or key_id is None:
            return
        seconds, usd = self.hold(max_new_tokens)
        hold_id = self.budgets.reserve(key_id, budget_usd, usd)
        if hold_id is None:
            state = self.budgets.status(key_id)
            raise InsufficientQuotaError(
                f"This API key's budget of ${budget_usd:.6f} cannot cover this request (up to ${usd:.6f}): "
                f"${state['spent_usd']:.6f} is spent and ${state['held_usd']:.6f} is held by requests in progress. "
                "Lower max_tokens, wait for requests in progress, or raise the budget."
            )
        charge.ceiling_seconds, charge.hold_usd, charge.hold_id = seconds, usd, hold_id

    def settle(self, key_id: str | None, charge: Charge, row: dict[str, Any], agents: list[dict[str, Any]] | None = None) -> float:
        """Record the turn (and its `agents`' shares: each with its engine seconds, its
        cost set here) and release its hold; returns its cost. Blocking (SQL)."""
        usd = cost_usd(charge.engine_seconds, self.cost_per_hour)
        if charge.hold_usd:
            usd = min(usd, charge.hold_usd)  # the ceiling already bounds it; this drops float dust
        row = {**row, "engine_seconds": charge.engine_seconds, "cost_usd": usd}
        for a in agents or []:
            # The turn's cost in proportion to engine time: the shares add up to it.
            a["cost_usd"] = usd * a["engine_seconds"] / charge.engine_seconds if charge.engine_seconds > 0 else 0.0
        self.ledger.record(row, agents)
        if charge.hold_id is not None and key_id is not None:
            self.budgets.settle(key_id, charge.hold_id, usd)
        completion = row.get("completion_tokens") or 0
        if completion and charge.engine_seconds > 0 and not charge.capped:
            # Learn the pace (engine seconds per generated token, prefill included).
            self.seconds_per_token = 0.8 * self.seconds_per_token + 0.2 * (charge.engine_seconds / completion)
        return usd
