"""The customer-support pack: tickets, orders, subscriptions, refunds and hand-off to a human.

Every tool acts for the calling principal's customer (the API key's `user`, e.g.
`cust_1001`) in the calling tenant's own database (`ctx.data`), and never reads or
changes another customer's records, nor any record of another tenant.

Options (`tool_options: {"support": {...}}`):
  refund_limit   largest refund, in EUR, that the assistant may make (default 200)
  seed           what a tenant's new database starts with: "demo" (default), "none", or
                 a JSON file mapping tenants to records (tools/support/store.py: Seeds)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from pydantic import Field

from server.errors import ConfigError
from server.toolcalls.registry import ToolContext, ToolError, tool
from tools.support import store

_state: dict[str, Any] = {"refund_limit": 200.0, "seeds": store.Seeds()}

TicketId = Annotated[str, Field(pattern=r"^T-[0-9]{4}$", description="ticket id, e.g. T-1001")]
# Reason codes, not free text: reports can group by them, and a small model cannot ramble.
RefundReason = Literal["damaged", "not_received", "duplicate_charge", "cancelled_service", "other"]
OrderId = Annotated[str, Field(pattern=r"^ORD-[0-9]{4}$", description="order id, e.g. ORD-5002")]


def setup(settings: Any) -> None:
    options = dict(settings.tool_options.get("support", {}))
    if "database" in options:
        raise ConfigError(
            "ENCLAVE_TOOL_OPTIONS: support.database is gone: each tenant has its own database under ENCLAVE_PACK_DATA_DIR"
        )
    configure(float(options.get("refund_limit", 200)), options.get("seed", "demo"))


def configure(refund_limit: float = 200.0, seed: Any = "demo") -> None:
    _state["refund_limit"] = refund_limit
    _state["seeds"] = store.Seeds(seed)


def init_tenant_data(conn: sqlite3.Connection, tenant: str) -> None:
    """A tenant's new database: the schema, and the records the `seed` option gives it."""
    store.create_schema(conn)
    store.seed(conn, _state["seeds"].for_tenant(tenant))


def reset_tenant_data(conn: sqlite3.Connection, tenant: str) -> None:
    """`enclave demo reset`: every record dropped, the tenant's seed records back."""
    store.reset(conn, _state["seeds"].for_tenant(tenant))


@contextmanager
def _db(ctx: ToolContext) -> Iterator[sqlite3.Connection]:
    if ctx.data is None:
        raise ToolError("the support pack's data is not configured on this server")
    with ctx.data.connect() as conn:
        yield conn


def _customer_order(conn: sqlite3.Connection, ctx: ToolContext, order_id: str) -> sqlite3.Row:
    order = conn.execute("SELECT * FROM orders WHERE id = ? AND customer_id = ?", (order_id, ctx.user)).fetchone()
    if order is None:  # another customer's order looks exactly like a missing one
        raise ToolError(f"no order {order_id} was found for this customer")
    return order


def _refunded_cents(conn: sqlite3.Connection, order_id: str) -> int:
    return conn.execute("SELECT COALESCE(SUM(amount_cents), 0) FROM refunds WHERE order_id = ?", (order_id,)).fetchone()[0]


def _euros(cents: int) -> float:
    return round(cents / 100, 2)


@tool(
    rate_limit="30/minute",
    retries=1,
    timeout=5,
    examples=[{"ticket_id": "T-1001"}],
    asks=["What is going on with my ticket?", "Is my support case solved yet?", "Give me an update on my request."],
)
def lookup_ticket(ctx: ToolContext, ticket_id: TicketId) -> dict[str, Any]:
    """Look up one of the customer's support tickets by id (subject, status, details, related order)."""
    with _db(ctx) as conn:
        row = conn.execute("SELECT * FROM tickets WHERE id = ? AND customer_id = ?", (ticket_id, ctx.user)).fetchone()
    if row is None:  # another customer's ticket looks exactly like a missing one
        raise ToolError(f"no ticket {ticket_id} was found for this customer")
    return {k: row[k] for k in ("id", "subject", "status", "order_id", "body", "opened_on")}


@tool(
    rate_limit="30/minute",
    retries=1,
    timeout=5,
    examples=[{}],
    asks=["What plan do I have?", "Is my subscription active or cancelled?", "When is my next renewal and what does it cost?"],
)
def check_subscription_status(ctx: ToolContext) -> dict[str, Any]:
    """Check the customer's subscription: plan, status (active, past_due, cancelled), renewal date and price."""
    with _db(ctx) as conn:
        row = conn.execute("SELECT * FROM subscriptions WHERE customer_id = ?", (ctx.user,)).fetchone()
    if row is None:
        raise ToolError("this customer has no subscription")
    return {"plan": row["plan"], "status": row["status"], "renews_on": row["renews_on"], "monthly_price_eur": _euros(row["monthly_price_cents"])}


@tool(
    rate_limit="30/minute",
    retries=1,
    timeout=5,
    examples=[{"order_id": "ORD-5002"}],
    asks=["Where is my order?", "What did I buy in this order and what did it cost?", "How much of my order can still be refunded?"],
)
def lookup_order(ctx: ToolContext, order_id: OrderId) -> dict[str, Any]:
    """Look up one of the customer's orders by id: item, amount, date placed, what is refunded, and whether a refund is still possible."""
    with _db(ctx) as conn:
        order = _customer_order(conn, ctx, order_id)
        refunded = _refunded_cents(conn, order_id)
    left = order["amount_cents"] - refunded
    limit = _state["refund_limit"]
    if left <= 0:
        eligible, why = False, "the order is fully refunded"
    elif left > round(limit * 100):
        # Worded as a fact, not an order: the tool-result rail neutralises instructions.
        eligible, why = False, f"a full refund of {_euros(left):.2f} EUR is above the assistant's limit of {limit:.2f} EUR; refunds above it are made by a person"
    else:
        eligible, why = True, f"up to {_euros(left):.2f} EUR can be refunded"
    return {
        "order_id": order["id"],
        "item": order["item"],
        "amount_eur": _euros(order["amount_cents"]),
        "placed_on": order["placed_on"],
        "refunded_eur": _euros(refunded),
        "refundable_eur": _euros(max(left, 0)),
        "refund_eligible": eligible,
        "refund_note": why,
    }


def _refund_check(conn: sqlite3.Connection, ctx: ToolContext, order_id: str, amount: float) -> sqlite3.Row:
    order = _customer_order(conn, ctx, order_id)
    limit = _state["refund_limit"]
    if amount > limit:
        raise ToolError(f"refunds above {limit:.2f} EUR need a human agent; use handoff_to_agent")
    refunded = _refunded_cents(conn, order_id)
    if round(amount * 100) > order["amount_cents"] - refunded:
        raise ToolError(f"order {order_id} has only {_euros(order['amount_cents'] - refunded):.2f} EUR left to refund")
    return order


def _precheck_refund(ctx: ToolContext, order_id: str, amount: float, reason: str) -> None:
    """Refuse before asking the user to confirm something that would fail anyway."""
    with _db(ctx) as conn:
        _refund_check(conn, ctx, order_id, amount)


@tool(
    destructive=True,
    rate_limit="5/minute",
    timeout=10,
    confirm="refund {amount:.2f} EUR on order {order_id} (reason: {reason})",
    precheck=_precheck_refund,
    examples=[{"order_id": "ORD-5002", "amount": 20.28, "reason": "damaged"}],
    asks=["I want my money back for this order.", "Please refund me, the item arrived broken.", "I paid twice, give me a refund."],
)
def create_refund(ctx: ToolContext, order_id: OrderId, amount: Annotated[float, Field(gt=0, le=10000, description="EUR")], reason: RefundReason) -> dict[str, Any]:
    """Refund part or all of one of the customer's orders to the original payment method."""
    with _db(ctx) as conn:
        conn.execute("BEGIN IMMEDIATE")  # check and insert under one write lock
        try:
            if ctx.idempotency_key:
                done = conn.execute("SELECT * FROM refunds WHERE idempotency_key = ?", (ctx.idempotency_key,)).fetchone()
                if done is not None:  # a repeated execution returns the first one's refund
                    conn.execute("ROLLBACK")
                    return {"refund_id": done["id"], "order_id": done["order_id"], "amount_eur": _euros(done["amount_cents"]), "status": "refunded"}
            _refund_check(conn, ctx, order_id, amount)
            cur = conn.execute(
                "INSERT INTO refunds (order_id, customer_id, amount_cents, reason, idempotency_key, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (order_id, ctx.user, round(amount * 100), reason, ctx.idempotency_key, store.now()),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return {"refund_id": cur.lastrowid, "order_id": order_id, "amount_eur": round(amount, 2), "status": "refunded"}


def _conversation_summary(messages: list[dict[str, Any]], limit: int = 600) -> str:
    said = [f"{m['role']}: {m['content'].strip()}" for m in messages if m.get("role") in ("user", "assistant") and m.get("content")]
    text = " | ".join(said[-8:])
    return text if len(text) <= limit else "…" + text[-limit:]


@tool(
    rate_limit="5/minute",
    timeout=5,
    idempotent=False,
    examples=[{"reason": "the customer asks for a person"}],
    asks=["I want to speak to a human.", "Escalate this to a person.", "Let someone from your team handle this."],
)
def handoff_to_agent(ctx: ToolContext, reason: Annotated[str, Field(min_length=3, max_length=120)]) -> dict[str, Any]:
    """Hand the conversation over to a human support agent, with the reason; use it when you cannot help."""
    summary = _conversation_summary(ctx.messages)
    with _db(ctx) as conn:
        cur = conn.execute(
            "INSERT INTO handoffs (customer_id, reason, summary, status, created_at) VALUES (?, ?, ?, 'queued', ?)",
            (ctx.user, reason, summary or "(no conversation)", store.now()),
        )
    return {"handoff_id": cur.lastrowid, "status": "queued", "message": "A human agent will pick this up shortly."}
