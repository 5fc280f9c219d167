"""The customer-support pack's database: a real SQLite file with seeded demo data.

Demo customers are `cust_1001` (Alice), `cust_1002` (Bob) and `cust_1003` (Carla); an
API key created with `--user cust_1001` acts as Alice and sees only her records.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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

CUSTOMERS = [
    ("cust_1001", "Alice Martin", "alice@example.com"),
    ("cust_1002", "Bob Chen", "bob@example.com"),
    ("cust_1003", "Carla Diaz", "carla@example.com"),
]
SUBSCRIPTIONS = [
    ("cust_1001", "Pro", "active", "2027-01-15", 2000),
    ("cust_1002", "Team", "past_due", "2026-11-01", 7500),
    ("cust_1003", "Basic", "cancelled", None, 500),
]
ORDERS = [
    ("ORD-5001", "cust_1001", "Pro plan, annual", 24000, "EUR", "2026-01-15"),
    ("ORD-5002", "cust_1001", "USB-C dock", 8999, "EUR", "2026-10-30"),
    ("ORD-5003", "cust_1002", "Team plan, 5 seats", 15000, "EUR", "2026-10-01"),
    ("ORD-5004", "cust_1003", "Basic plan, monthly", 500, "EUR", "2026-09-12"),
]
TICKETS = [
    ("T-1001", "cust_1001", "USB-C dock arrived damaged", "open", "ORD-5002",
     "The dock I received on 2 November has a cracked case and the HDMI port does not work.", "2026-11-03"),
    ("T-1002", "cust_1001", "Change invoice address", "closed", None,
     "Please send invoices to our new office address from December.", "2026-08-20"),
    ("T-1003", "cust_1002", "Cannot add seats", "open", "ORD-5003",
     "Adding a sixth seat fails with a payment error.", "2026-11-10"),
    ("T-1004", "cust_1003", "Reactivate account", "pending", None,
     "I cancelled by mistake; can my account be reactivated?", "2026-11-15"),
]


class SupportStore:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as conn:
            conn.executescript(SCHEMA)
            if conn.execute("SELECT COUNT(*) FROM customers").fetchone()[0] == 0:
                self._seed(conn)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _seed(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?)", CUSTOMERS)
        conn.executemany("INSERT INTO subscriptions VALUES (?, ?, ?, ?, ?)", SUBSCRIPTIONS)
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)", ORDERS)
        conn.executemany("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?, ?)", TICKETS)
        conn.execute("COMMIT")

    def reset(self) -> None:
        """Drop everything (refunds and handoffs included) and seed the demo data again."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            for table in ("refunds", "handoffs", "tickets", "orders", "subscriptions", "customers"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("COMMIT")
            self._seed(conn)

    def now(self) -> float:
        return time.time()
