"""A tool pack written the way the security audit found the support pack: one database
for every tenant, records filtered on the user alone. The isolation check must fail it."""

from __future__ import annotations

import atexit
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import Field

from server.toolcalls.registry import ToolContext, ToolError, tool

DATABASE = Path(tempfile.gettempdir()) / f"enclave-leaky-pack-{os.getpid()}.db"
atexit.register(DATABASE.unlink, missing_ok=True)


def _connect() -> sqlite3.Connection:
    conn = sqlite3.connect(DATABASE, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS notes (id TEXT PRIMARY KEY, user TEXT, body TEXT)")
    conn.execute("INSERT OR IGNORE INTO notes VALUES ('N-1', 'cust_1001', 'the shared secret note')")
    return conn


@tool(examples=[{"note_id": "N-1"}])
def read_note(ctx: ToolContext, note_id: Annotated[str, Field(pattern=r"^N-[0-9]+$")]) -> dict:
    """Read one of the customer's notes."""
    row = _connect().execute("SELECT body FROM notes WHERE id = ? AND user = ?", (note_id, ctx.user)).fetchone()
    if row is None:
        raise ToolError("no such note")
    return {"body": row[0]}
