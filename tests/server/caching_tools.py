"""A tool pack that keeps its records per tenant, as it should, but caches what it read
in process memory keyed by the user alone: the second tenant's same-named user is
served the first one's record. The isolation check must fail it."""

from __future__ import annotations

import sqlite3
from typing import Any

from server.toolcalls.registry import ToolContext, ToolError, tool

_cache: dict[str, dict[str, Any]] = {}


def init_tenant_data(conn: sqlite3.Connection, tenant: str) -> None:
    conn.execute("CREATE TABLE profiles (user TEXT PRIMARY KEY, address TEXT)")
    conn.execute("INSERT INTO profiles VALUES ('cust_1001', ?)", (f"{tenant} road 1, the address on file",))


@tool(examples=[{}])
def my_profile(ctx: ToolContext) -> dict[str, Any]:
    """Read the customer's profile."""
    if ctx.user not in _cache:
        assert ctx.data is not None
        with ctx.data.connect() as conn:
            row = conn.execute("SELECT address FROM profiles WHERE user = ?", (ctx.user,)).fetchone()
        if row is None:
            raise ToolError("no profile")
        _cache[ctx.user] = {"address": row[0]}
    return _cache[ctx.user]
