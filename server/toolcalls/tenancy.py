"""Tenant-scoped data for tool packs: every tenant of every pack has a database of its own.

A tool never opens its pack's data by path. `ctx.data.connect()` opens the calling
tenant's database, the only one a ToolContext can reach, so however a pack writes its
SQL it cannot read or change another tenant's records: isolation by construction, as
each tenant's vectors live in collections of their own. Within a tenant, records of
different users are the pack's to keep apart (filter on `ctx.user`).

A pack that keeps data defines `init_tenant_data(conn, tenant)`: it creates the schema
(and any seed data) of a tenant's database, and runs once per database, under a file
lock, when a tool of that tenant first connects. Databases are SQLite files under
`ENCLAVE_PACK_DATA_DIR/<pack>/`, named by a digest of the tenant (a tenant name may be
anything); replicas share them through that directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TenantInit = Callable[[sqlite3.Connection, str], None]

# Written by PackData itself into every tenant database: whose it is (file names are digests).
_OWNER_TABLE = "enclave_tenant"
_INITIALISED = 1  # PRAGMA user_version once init_tenant_data has run


def tenant_database(root: Path, pack: str, tenant: str) -> Path:
    """Where `tenant`'s database of `pack` lives under the pack data directory."""
    return root / pack / f"{hashlib.sha256(tenant.encode()).hexdigest()[:32]}.db"


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class PackData:
    """The databases of one pack, one per tenant."""

    def __init__(self, pack: str, root: Path, init: TenantInit | None = None):
        self.pack = pack
        self.root = root
        self.init = init
        self._ready: set[str] = set()

    def for_tenant(self, tenant: str) -> TenantData:
        return TenantData(self, tenant)

    def path(self, tenant: str) -> Path:
        return tenant_database(self.root, self.pack, tenant)

    @contextmanager
    def connect(self, tenant: str) -> Iterator[sqlite3.Connection]:
        path = self.path(tenant)
        if tenant not in self._ready:
            self._initialise(tenant, path)
        conn = _open(path)
        try:
            yield conn
        finally:
            conn.close()

    def _initialise(self, tenant: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One process initialises a database; the others wait on the lock, then see it done.
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            conn = _open(path)
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] < _INITIALISED:
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {_OWNER_TABLE} (name TEXT NOT NULL)")
                    conn.execute(f"DELETE FROM {_OWNER_TABLE}")
                    conn.execute(f"INSERT INTO {_OWNER_TABLE} VALUES (?)", (tenant,))
                    if self.init is not None:
                        self.init(conn, tenant)
                    conn.execute(f"PRAGMA user_version = {_INITIALISED}")
            finally:
                conn.close()
        self._ready.add(tenant)

    def tenants(self) -> list[str]:
        """The tenants that have a database of this pack."""
        found = []
        for path in sorted((self.root / self.pack).glob("*.db")):
            conn = _open(path)
            try:
                row = conn.execute(f"SELECT name FROM {_OWNER_TABLE}").fetchone()
            except sqlite3.OperationalError:
                row = None
            finally:
                conn.close()
            if row is not None:
                found.append(row[0])
        return found


@dataclass(frozen=True)
class TenantData:
    """One tenant's data of one pack: what a tool reaches as `ctx.data`."""

    pack_data: PackData
    tenant: str

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection (autocommit; `BEGIN IMMEDIATE` for a transaction) to this tenant's
        database, created and initialised on first use."""
        with self.pack_data.connect(self.tenant) as conn:
            yield conn


def user_tables(conn: sqlite3.Connection) -> list[str]:
    """The pack's own tables of a tenant database (not SQLite's, not PackData's)."""
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
    return [r[0] for r in rows if r[0] != _OWNER_TABLE]
