"""Schema migrations: Alembic revisions in server/migrations, applied at start-up.

Every replica runs `upgrade()` when it starts. On PostgreSQL the upgrade holds an
advisory lock inside its transaction, so replicas that start together migrate once and
the others find the schema already at head. A database created before migrations
existed (its tables there, no `alembic_version`) is stamped at the baseline first, then
upgraded like any other.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as Database

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The revision that matches the schema every pre-migration database already has.
BASELINE = "0001"
# Any fixed number: the key of the PostgreSQL advisory lock the upgrade holds.
_LOCK_KEY = 0x656E636C  # "encl"
# Alembic's `context` and `op` are module globals: one migration at a time per process.
_local_lock = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def current(engine: Database) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _file_lock(engine: Database) -> Iterator[None]:
    """SQLite takes its write lock only at the first write, so processes sharing a file
    (a server and `enclave db upgrade`) would all see an empty schema: lock a file beside it."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade(engine: Database, revision: str = "head") -> None:
    with _local_lock, _file_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
        config = alembic_config(conn)
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and "tool_audit" in tables:
            command.stamp(config, BASELINE)
        command.upgrade(config, revision)
