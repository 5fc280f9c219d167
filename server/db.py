"""Relational state (SQLAlchemy Core): pending actions and the tool audit log.

SQLite file by default, any SQLAlchemy URL (PostgreSQL) by setting. Nothing that must
survive a restart or be shared by replicas lives in process memory: rate limits are
counted from the audit log and confirmations are rows updated atomically.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

tool_audit = Table(
    "tool_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("request_id", String(64)),
    Column("tenant", String(128)),
    Column("user", String(128)),
    Column("key_id", String(64)),
    Column("tool", String(128), nullable=False, index=True),
    Column("arguments", Text),  # redacted
    Column("status", String(32), nullable=False),
    Column("error", Text),
    Column("duration_ms", Float),
    Column("attempts", Integer),
    Column("action_id", String(64)),
)

pending_actions = Table(
    "pending_actions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128)),
    Column("user", String(128)),
    Column("key_id", String(64)),
    Column("tool", String(128), nullable=False),
    Column("arguments", Text, nullable=False),  # exact, needed to execute; never logged
    Column("summary", Text, nullable=False),
    # pending → executing → succeeded | failed; pending → cancelled | expired
    Column("status", String(16), nullable=False),
    Column("result", Text),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("decided_at", Float),
    Column("decided_by", String(128)),
)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def connect(url: str) -> Engine:
    """An engine with the schema created. SQLite gets WAL and a busy timeout so
    concurrent writers (20 simultaneous approvals) queue instead of failing."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    return engine
