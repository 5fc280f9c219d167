"""The tool audit log (`tool_audit`): one row per tool call outcome, its owner.

Written by the executor for every outcome (model calls and confirmed actions alike);
read for rate limits, by the router (what the previous turn's calls did) and by tests;
forgotten with a user (server/forgetting.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, delete, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database

from server.auth import Principal
from server.db import tool_audit


class ToolAudit:
    def __init__(self, db: Database):
        self.db = db

    def write(self, row: dict[str, Any]) -> None:
        with self.db.begin() as conn:
            conn.execute(insert(tool_audit).values(**row))

    def recent_calls(self, tool: str, principal: Principal, within_s: float, statuses: Iterable[str]) -> int:
        """How many calls of `tool` this key (or, keyless, this user) made lately."""
        who = tool_audit.c.key_id == principal.key_id if principal.key_id else and_(tool_audit.c.tenant == principal.tenant, tool_audit.c.user == principal.user)
        query = select(func.count()).select_from(tool_audit).where(tool_audit.c.tool == tool, who, tool_audit.c.at > time.time() - within_s, tool_audit.c.status.in_(list(statuses)))
        with self.db.connect() as conn:
            return conn.execute(query).scalar_one()

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        query = select(tool_audit).order_by(tool_audit.c.id)
        for key, value in where.items():
            query = query.where(tool_audit.c[key] == value)
        with self.db.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def calls_of(self, request_id: str) -> list[tuple[str, str]]:
        """(tool, status) of each call a turn made."""
        with self.db.connect() as conn:
            return [(r.tool, r.status) for r in conn.execute(select(tool_audit.c.tool, tool_audit.c.status).where(tool_audit.c.request_id == request_id))]

    @staticmethod
    def forget(conn: Connection, tenant: str, user: str) -> dict[str, int]:
        return {"tool_audit": conn.execute(delete(tool_audit).where(tool_audit.c.tenant == tenant, tool_audit.c.user == user)).rowcount or 0}
