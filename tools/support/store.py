"""The customer-support pack's data: its schema, the demo records, and seeding.

Each tenant has a database of its own (server/toolcalls/tenancy.py). What a new tenant
database starts with is the pack's `seed` option: the demo records below (the default),
nothing, or the records a JSON file gives for that tenant. Demo customers are
`cust_1001` (Alice), `cust_1002` (Bob) and `cust_1003` (Carla); an API key created with
`--user cust_1001` acts as Alice and sees only her records of its own tenant.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from server.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (
    customer_id TEXT PRIMARY KEY REFERENCES customers(id), plan TEXT NOT NULL, status TEXT NOT NULL,
    renews_on TEXT, monthly_price_cents INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY, customer_id TEXT NOT NULL REFERENCES customers(id), item TEXT NOT NULL,
    amount_cents INTEGER NOT NULL, currency TEXT NOT NULL, placed_on TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tickets (
    id TEXT PRIMARY KEY, customer_id TEXT NOT NULL REFERENCES customers(id), subject TEXT NOT NULL,
    status TEXT NOT NULL, order_id TEXT, body TEXT NOT NULL, opened_on TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refunds (
    id INTEGER PRIMARY KEY AUTOINCREMENT, order_id TEXT NOT NULL REFERENCES orders(id),
    customer_id TEXT NOT NULL, amount_cents INTEGER NOT NULL, reason TEXT NOT NULL,
    idempotency_key TEXT UNIQUE, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS handoffs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, customer_id TEXT NOT NULL, reason TEXT NOT NULL,
    summary TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL);
"""

# Parents before children (foreign keys); seed files may give any of these tables.
TABLES = ("customers", "subscriptions", "orders", "tickets", "refunds", "handoffs")

Records = dict[str, list[dict[str, Any]]]

DEMO: Records = {
    "customers": [
        {"id": "cust_1001", "name": "Alice Martin", "email": "alice@example.com"},
        {"id": "cust_1002", "name": "Bob Chen", "email": "bob@example.com"},
        {"id": "cust_1003", "name": "Carla Diaz", "email": "carla@example.com"},
    ],
    "subscriptions": [
        {"customer_id": "cust_1001", "plan": "Pro", "status": "active", "renews_on": "2027-01-15", "monthly_price_cents": 2000},
        {"customer_id": "cust_1002", "plan": "Team", "status": "past_due", "renews_on": "2026-11-01", "monthly_price_cents": 7500},
        {"customer_id": "cust_1003", "plan": "Basic", "status": "cancelled", "renews_on": None, "monthly_price_cents": 500},
    ],
    "orders": [
        {"id": "ORD-5001", "customer_id": "cust_1001", "item": "Pro plan, annual", "amount_cents": 24000, "currency": "EUR", "placed_on": "2026-01-15"},
        {"id": "ORD-5002", "customer_id": "cust_1001", "item": "USB-C dock", "amount_cents": 8999, "currency": "EUR", "placed_on": "2026-10-30"},
        {"id": "ORD-5003", "customer_id": "cust_1002", "item": "Team plan, 5 seats", "amount_cents": 15000, "currency": "EUR", "placed_on": "2026-10-01"},
        {"id": "ORD-5004", "customer_id": "cust_1003", "item": "Basic plan, monthly", "amount_cents": 500, "currency": "EUR", "placed_on": "2026-09-12"},
    ],
    "tickets": [
        {"id": "T-1001", "customer_id": "cust_1001", "subject": "USB-C dock arrived damaged", "status": "open", "order_id": "ORD-5002",
         "body": "The dock I received on 2 November has a cracked case and the HDMI port does not work.", "opened_on": "2026-11-03"},
        {"id": "T-1002", "customer_id": "cust_1001", "subject": "Change invoice address", "status": "closed", "order_id": None,
         "body": "Please send invoices to our new office address from December.", "opened_on": "2026-08-20"},
        {"id": "T-1003", "customer_id": "cust_1002", "subject": "Cannot add seats", "status": "open", "order_id": "ORD-5003",
         "body": "Adding a sixth seat fails with a payment error.", "opened_on": "2026-11-10"},
        {"id": "T-1004", "customer_id": "cust_1003", "subject": "Reactivate account", "status": "pending", "order_id": None,
         "body": "I cancelled by mistake; can my account be reactivated?", "opened_on": "2026-11-15"},
    ],
}


class Seeds:
    """Which records a tenant's new database starts with (the pack's `seed` option):
    "demo" (every tenant: the demo records), "none", or the path of a JSON file that maps
    tenant names to "demo", "none" or {table: [row objects]}, with "*" for any other
    tenant (absent: none)."""

    def __init__(self, option: Any = "demo"):
        self.by_tenant: dict[str, Records] = {}
        self.default: Records = {}
        if option in (None, "demo"):
            self.default = DEMO
        elif option == "none":
            pass
        elif isinstance(option, str):
            self._read(Path(option))
        else:
            raise ConfigError(f"ENCLAVE_TOOL_OPTIONS: support.seed must be 'demo', 'none' or a JSON file, not {option!r}")

    def _read(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ENCLAVE_TOOL_OPTIONS: support.seed file {path} cannot be read as JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"ENCLAVE_TOOL_OPTIONS: support.seed file {path} must map tenant names to records")
        for tenant, value in data.items():
            records = self._records(path, tenant, value)
            _try_seed(path, tenant, records)
            if tenant == "*":
                self.default = records
            else:
                self.by_tenant[tenant] = records

    @staticmethod
    def _records(path: Path, tenant: str, value: Any) -> Records:
        if value == "demo":
            return DEMO
        if value == "none":
            return {}
        if not isinstance(value, dict) or any(t not in TABLES or not isinstance(rows, list) for t, rows in value.items()):
            raise ConfigError(f"ENCLAVE_TOOL_OPTIONS: support.seed file {path}: tenant {tenant!r} needs 'demo', 'none' or lists of rows of {', '.join(TABLES)}")
        return value

    def for_tenant(self, tenant: str) -> Records:
        return self.by_tenant.get(tenant, self.default)


def _try_seed(path: Path, tenant: str, records: Records) -> None:
    """Seed an in-memory copy, so a wrong column fails at start-up, not at a tool call."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        create_schema(conn)
        seed(conn, records)
    except (sqlite3.Error, AttributeError, TypeError) as exc:
        raise ConfigError(f"ENCLAVE_TOOL_OPTIONS: support.seed file {path}: the records of tenant {tenant!r} do not fit the schema: {exc}") from None
    finally:
        conn.close()


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


def seed(conn: sqlite3.Connection, records: Records) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table in TABLES:
            for row in records.get(table, []):
                columns = list(row)
                conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})", [row[c] for c in columns])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def reset(conn: sqlite3.Connection, records: Records) -> None:
    """Drop every record (refunds and handoffs included) and seed again."""
    conn.execute("BEGIN IMMEDIATE")
    for table in reversed(TABLES):
        conn.execute(f"DELETE FROM {table}")
    conn.execute("COMMIT")
    seed(conn, records)


def now() -> float:
    return time.time()
