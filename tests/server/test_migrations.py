"""Schema migrations (server/migrate.py) on SQLite and PostgreSQL: the revisions build
exactly the schema the code declares, an old database is brought up without losing its
rows, and replicas that start together migrate once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, select, text

from server import migrate
from server.db import connect, file_contents, files, metadata, tool_audit
from server.migrate import BASELINE


def test_migrations_build_the_declared_schema(db_url):
    engine = connect(db_url)
    assert migrate.current(engine) == migrate.head() == "0008"
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == [], diff
    engine.dispose()


def test_a_database_from_before_migrations_is_stamped_and_upgraded_keeping_its_rows(db_url):
    old = create_engine(db_url)
    # What `metadata.create_all` made before migrations existed is the baseline revision's
    # schema, without Alembic's version table.
    migrate.upgrade(old, BASELINE)
    with old.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(insert(tool_audit).values(at=1.0, tool="lookup_ticket", status="ok"))
    assert "alembic_version" not in inspect(old).get_table_names()
    old.dispose()

    engine = connect(db_url)
    assert migrate.current(engine) == migrate.head()
    with engine.begin() as conn:
        assert conn.execute(select(tool_audit.c.tool)).scalars().all() == ["lookup_ticket"]
        conn.execute(insert(files).values(id="file-1", tenant="t", filename="a.md", purpose="assistants", bytes=1, sha256="x", created_at=1.0))
        conn.execute(insert(file_contents).values(file_id="file-1", data=b"\x00binary\xff"))
        assert conn.execute(select(file_contents.c.data)).scalar() == b"\x00binary\xff"
    engine.dispose()


def test_replicas_starting_together_migrate_once(db_url):
    env = {**os.environ, "ENCLAVE_DATABASE_URL": db_url}
    command = [sys.executable, "-m", "server.cli", "db", "upgrade"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert all(json.loads(out) == {"current": migrate.head(), "head": migrate.head()} for out, _ in outputs)
    with ThreadPoolExecutor(4) as pool:  # and threads of one process too
        engines = list(pool.map(lambda _: connect(db_url), range(4)))
    assert {migrate.current(e) for e in engines} == {migrate.head()}
    for engine in engines:
        engine.dispose()
