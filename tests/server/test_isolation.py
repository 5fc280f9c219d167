"""Tenant isolation of tool packs: every pack the project ships, and those its tests
enable, pass the check; a pack that ignores the tenant fails it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from server.config import load_settings
from server.toolcalls.isolation import check_packs
from server.toolcalls.registry import Registry, ToolContext, ToolError
from server.toolcalls.tenancy import tenant_database
from tools import support

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.parent.name for p in (ROOT / "tools").glob("*/__init__.py"))
TEST_PACKS = ["tests.e2e.faulty_tools", "tests.server.guarded_tools"]


@pytest.mark.parametrize("pack", SHIPPED + TEST_PACKS)
def test_pack_keeps_tenants_apart(pack):
    assert check_packs([pack]) == []


def test_isolation_check_fails_a_pack_that_ignores_the_tenant():
    from tests.server import leaky_tools

    findings = check_packs(["tests.server.leaky_tools"])
    leaky_tools.DATABASE.unlink(missing_ok=True)
    assert [(f.tool, f.kind) for f in findings] == [("read_note", "crossing")]
    assert "outside its tenant's own data" in findings[0].problem


def test_isolation_check_fails_a_cache_keyed_without_the_tenant():
    from tests.server import caching_tools

    findings = check_packs(["tests.server.caching_tools"])
    caching_tools._cache.clear()
    assert [(f.tool, f.kind) for f in findings] == [("my_profile", "crossing")]
    assert "tenant B was given tenant A's records: isolation-tenant-a road 1" in findings[0].problem


def test_same_user_name_in_two_tenants_sees_only_its_own_records(tmp_path):
    seeds = tmp_path / "seed.json"
    beta = {
        "customers": [{"id": "cust_1001", "name": "Bea Brown", "email": "bea@example.org"}],
        "orders": [{"id": "ORD-6001", "customer_id": "cust_1001", "item": "Keyboard", "amount_cents": 4500, "currency": "EUR", "placed_on": "2026-11-02"}],
        "tickets": [{"id": "T-2001", "customer_id": "cust_1001", "subject": "Keyboard keys stick", "status": "open", "order_id": "ORD-6001", "body": "Some keys stick.", "opened_on": "2026-11-05"}],
    }
    seeds.write_text(json.dumps({"beta": beta, "*": "demo"}))
    settings = load_settings(data_dir=tmp_path, tool_options={"support": {"seed": str(seeds)}})
    registry = Registry.load(["support"], settings)
    lookup, status, refund = (registry.get(n) for n in ("lookup_ticket", "check_subscription_status", "create_refund"))
    acme = ToolContext("acme", "cust_1001", None, "r1", idempotency_key="act_a")
    beta_ctx = ToolContext("beta", "cust_1001", None, "r2", idempotency_key="act_b")
    assert lookup.call(acme, {"ticket_id": "T-1001"})["subject"] == "USB-C dock arrived damaged"
    with pytest.raises(ToolError, match="no ticket T-1001"):
        lookup.call(beta_ctx, {"ticket_id": "T-1001"})
    assert lookup.call(beta_ctx, {"ticket_id": "T-2001"})["subject"] == "Keyboard keys stick"
    assert status.call(acme, {})["plan"] == "Pro"
    with pytest.raises(ToolError, match="no subscription"):
        status.call(beta_ctx, {})
    with pytest.raises(ToolError, match="no order ORD-5002"):
        refund.call(beta_ctx, {"order_id": "ORD-5002", "amount": 20.28, "reason": "damaged"})
    refund.call(beta_ctx, {"order_id": "ORD-6001", "amount": 10.0, "reason": "damaged"})
    with sqlite3.connect(tenant_database(settings.resolved_pack_data_dir, "support", "acme")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM refunds").fetchone()[0] == 0
    with sqlite3.connect(tenant_database(settings.resolved_pack_data_dir, "support", "beta")) as conn:
        assert conn.execute("SELECT order_id, amount_cents FROM refunds").fetchall() == [("ORD-6001", 1000)]
    assert sorted(registry.data["support"].tenants()) == ["acme", "beta"]
    support.configure()


def test_support_seed_file_that_does_not_fit_stops_start_up(tmp_path):
    from server.errors import ConfigError

    seeds = tmp_path / "seed.json"
    seeds.write_text(json.dumps({"beta": {"customers": [{"id": "c", "nickname": "x"}]}}))
    with pytest.raises(ConfigError, match="do not fit the schema"):
        Registry.load(["support"], load_settings(data_dir=tmp_path, tool_options={"support": {"seed": str(seeds)}}))
    with pytest.raises(ConfigError, match="support.database is gone"):
        Registry.load(["support"], load_settings(data_dir=tmp_path, tool_options={"support": {"database": "x.db"}}))
