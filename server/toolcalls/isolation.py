"""The tenant-isolation check of tool packs: every tool of every pack is run as two
tenants whose users have the same name, and any crossing is reported.

Tenant A's database of each pack starts as the pack seeds it; tenant B's is emptied (its
schema kept). Every tool runs with each of its declared `examples` (a destructive one as
if confirmed), first as A, then as B. It is a crossing when

- B's calls changed a row of A's database;
- a result B got holds a text value that only A's records hold;
- a tool opened a database or wrote a file other than its own tenant's database (seen
  through Python's audit hooks): a private store shared by all tenants.

A cache in process memory keyed without the tenant shows as the second kind: A runs
first, so B is served what A's calls cached. A tool that takes arguments but declares
no examples cannot be run, and one that reaches the network cannot be judged here;
both are reported as unchecked. The test suite runs this over every pack in tools/
(tests/server/test_isolation.py), and pack authors can run `enclave tools check`.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.toolcalls.registry import Registry, Tool, ToolContext
from server.toolcalls.tenancy import PackData, user_tables

TENANT_A = "isolation-tenant-a"
TENANT_B = "isolation-tenant-b"


@dataclass(frozen=True)
class Finding:
    pack: str
    tool: str
    kind: str  # crossing | unchecked
    problem: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.pack}.{self.tool}: {self.problem}"


@dataclass
class _Outcome:
    ok: bool
    value: Any
    touched: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- what a call touches

_watching: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("isolation_watch", default=None)
_hook_installed = False


def _audit(event: str, args: tuple) -> None:
    seen = _watching.get()
    if seen is None:
        return
    if event == "sqlite3.connect":
        seen.append(("database", str(args[0])))
    elif event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes:
            seen.append(("file", os.fsdecode(args[0])))
    elif event == "socket.connect":
        seen.append(("network", str(args[1]) if len(args) > 1 else "?"))


def _install_hook() -> None:
    # An audit hook cannot be removed: one is installed once, and records only inside
    # the check's own calls (a context variable; worker threads inherit it).
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True


# ---------------------------------------------------------------- running tools


async def _run(tool: Tool, tenant: str, user: str, arguments: dict[str, Any], n: int) -> _Outcome:
    ctx = ToolContext(tenant, user, None, f"isolation-{n}", [{"role": "user", "content": "isolation check"}], idempotency_key=f"isolation-{tenant}-{n}")
    seen: list[tuple[str, str]] = []

    def call() -> Any:
        _watching.set(seen)
        if tool.precheck is not None:
            tool.precheck(tool.bind(ctx), **arguments)
        return tool.call(ctx, arguments)

    try:
        if inspect.iscoroutinefunction(tool.fn):
            token = _watching.set(seen)
            try:
                value = await asyncio.wait_for(tool.call(ctx, arguments), tool.timeout)
            finally:
                _watching.reset(token)
        else:
            value = await asyncio.wait_for(asyncio.to_thread(call), tool.timeout)
        outcome = _Outcome(True, value)
    except Exception as exc:  # noqa: BLE001 - a refusal or failure is an outcome here
        outcome = _Outcome(False, f"{type(exc).__name__}: {exc}")
    outcome.touched = [f"{kind} {what}" for kind, what in seen if not _own(kind, what, tool.data, tenant)]
    return outcome


def _own(kind: str, what: str, data: PackData | None, tenant: str) -> bool:
    if kind == "database" and what == ":memory:":
        return True
    if data is None or kind == "network":
        return False
    own = str(data.path(tenant))
    # The tenant's database, its journal files and its first-use lock.
    return what.startswith(own.removesuffix(".db"))


# ---------------------------------------------------------------- data of a tenant


def _dump(data: PackData, tenant: str) -> dict[str, list[tuple]]:
    with data.connect(tenant) as conn:
        return {t: sorted(tuple(r) for r in conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in user_tables(conn)}


def _empty(data: PackData, tenant: str) -> None:
    with data.connect(tenant) as conn:
        conn.execute("PRAGMA foreign_keys=OFF")
        for table in user_tables(conn):
            conn.execute(f'DELETE FROM "{table}"')


def _texts(value: Any) -> set[str]:
    """The text values inside a result (JSON text is read as JSON)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return {value}
        return _texts(parsed) if not isinstance(parsed, str) else {parsed}
    if isinstance(value, dict):
        return set().union(*(_texts(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_texts(v) for v in value)) if value else set()
    return set()


def _leaves(rows: dict[str, list[tuple]]) -> set[str]:
    # Short values (a status, a currency) are common words, not evidence of a crossing.
    return {v for table in rows.values() for row in table for v in row if isinstance(v, str) and len(v) >= 6}


# ---------------------------------------------------------------- the check


async def check_registry(registry: Registry, user: str = "cust_1001") -> list[Finding]:
    """Every tool of every pack of `registry` as TENANT_A then TENANT_B, the same user."""
    _install_hook()
    findings: list[Finding] = []
    n = 0
    for pack, tools in sorted(registry.packs.items()):
        data = registry.data.get(pack)
        calls: list[tuple[Tool, dict[str, Any]]] = []
        for tool in tools:
            required = tool.parameters.get("required") or []
            if not tool.examples and required:
                findings.append(Finding(pack, tool.name, "unchecked", "takes arguments but declares no examples to run it with"))
            calls += [(tool, arguments) for arguments in tool.examples or ([{}] if not required else [])]
        if data is not None:
            _empty(data, TENANT_B)
        for tool, arguments in calls:
            n += 1
            await _run(tool, TENANT_A, user, dict(arguments), n)
        before = _dump(data, TENANT_A) if data is not None else {}
        outcomes = []
        for tool, arguments in calls:
            n += 1
            outcome = await _run(tool, TENANT_B, user, dict(arguments), n)
            outcomes.append((tool, arguments, outcome))
            for touched in outcome.touched:
                kind = "unchecked" if touched.startswith("network") else "crossing"
                findings.append(Finding(pack, tool.name, kind, f"reached {touched}, outside its tenant's own data"))
        # Evidence of A is what A's records hold and B's own (after its calls) do not.
        only_a = _leaves(before) - (_leaves(_dump(data, TENANT_B)) if data is not None else set())
        for tool, arguments, outcome in outcomes:
            leaked = sorted(_texts(outcome.value) & only_a - _texts(arguments)) if outcome.ok else []
            if leaked:
                findings.append(Finding(pack, tool.name, "crossing", f"tenant B was given tenant A's records: {', '.join(leaked[:3])}"))
        if data is not None:
            after = _dump(data, TENANT_A)
            for table in sorted(set(before) | set(after)):
                if before.get(table) != after.get(table):
                    findings.append(Finding(pack, "*", "crossing", f"tenant B's calls changed tenant A's table {table}"))
    return sorted(set(findings), key=str)


def check_packs(packs: list[str], settings: Any = None) -> list[Finding]:
    """Load `packs` with their options over fresh, throw-away tenant databases and check them."""
    with tempfile.TemporaryDirectory(prefix="enclave-isolation-") as root:
        registry = Registry.load(packs, settings, data_root=Path(root))
        return asyncio.run(check_registry(registry))


