"""Shared fixtures: the live server (one per session, real engine) lives in tests/e2e.

`db_url` runs a test on SQLite and again on PostgreSQL, in a fresh database each time.
PostgreSQL comes from ENCLAVE_TEST_POSTGRES_URL (an account that may create databases);
where none answers, the PostgreSQL runs are skipped with a message that says so.
"""

from __future__ import annotations

import os
import secrets
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

POSTGRES_ADMIN_URL = os.environ.get("ENCLAVE_TEST_POSTGRES_URL", "postgresql+psycopg://enclave:enclave@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_admin():
    # A short connect timeout: where nothing listens the skip must be quick, not a hang.
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: no PostgreSQL here
        engine.dispose()
        pytest.skip(f"PostgreSQL is not reachable as {make_url(POSTGRES_ADMIN_URL).render_as_string()}: {type(exc).__name__}; set ENCLAVE_TEST_POSTGRES_URL")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'enclave.db'}"
        return
    admin = request.getfixturevalue("postgres_admin")
    name = "enclave_test_" + secrets.token_hex(4)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    for attempt in range(5):
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            return
        except ProgrammingError:
            # An autovacuum worker in it, which a role without pg_signal_backend cannot
            # end (scripts/start_postgres.sh grants it): it finishes soon.
            if attempt == 4:
                raise
            time.sleep(1)
