"""MCP servers as sources of server tools (server/mcp), against a real MCP server (the
SDK's MCPServer in tests/mcp_servers/helpdesk.py) over stdio and streamable HTTP; the
executor as the server runs it (scopes, validation, confirmation, audit). The live server
on the real engine is tests/e2e/test_mcp.py."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.auth import Principal
from server.db import connect, sqlite_url
from server.errors import ConfigError
from server.mcp.config import MCPServerConfig, parse
from server.mcp.tools import add_mcp_servers
from server.toolcalls.executor import Executor
from server.toolcalls.registry import Registry, ToolContext, ToolError

ROOT = Path(__file__).resolve().parents[2]
ALICE = Principal("acme", "cust_1001", ("*",), key_id="k1")


def stdio(tmp_path: Path, **extra) -> MCPServerConfig:
    return MCPServerConfig(label="helpdesk", command=["python", "-m", "tests.mcp_servers.helpdesk", "--ledger", str(tmp_path / "ledger.jsonl")], cwd=str(ROOT), **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    port = free_port()
    ledger = tmp_path_factory.mktemp("mcp") / "ledger.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tests.mcp_servers.helpdesk", "--http", str(port), "--ledger", str(ledger)], cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url, ledger
    proc.terminate()
    proc.wait(10)


def run(coro):
    return asyncio.run(coro)


def test_a_servers_tools_become_a_pack_with_its_scope_annotations_and_schemas(tmp_path):
    registry = Registry()
    add_mcp_servers(registry, [stdio(tmp_path)])
    assert sorted(t.name for t in registry.packs["mcp:helpdesk"]) == ["crash_server", "delete_note", "lookup_article", "whoami"]
    lookup, delete = registry.get("lookup_article"), registry.get("delete_note")
    assert lookup.scope == "tools:mcp:helpdesk" and lookup.idempotent and not lookup.destructive
    assert delete.destructive  # annotated destructiveHint by its server
    assert lookup.parameters == {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}
    assert registry.resolve("mcp:helpdesk.lookup_article", "tools") == [lookup]
    with pytest.raises(ToolError, match="topic"):
        lookup.validate({"subject": "warranty"})


def test_allowed_tools_and_operator_marks_are_applied_and_checked(tmp_path):
    registry = Registry()
    add_mcp_servers(registry, [stdio(tmp_path, allowed_tools=["lookup_article"], destructive=["lookup_article"])])
    assert [t.name for t in registry.packs["mcp:helpdesk"]] == ["lookup_article"]
    assert registry.get("lookup_article").destructive  # the operator's mark
    with pytest.raises(ConfigError, match="no tool named `nope`"):
        add_mcp_servers(Registry(), [stdio(tmp_path, allowed_tools=["nope"])])
    with pytest.raises(ConfigError, match="`gone` could not be reached"):
        add_mcp_servers(Registry(), [MCPServerConfig(label="gone", url=f"http://127.0.0.1:{free_port()}/mcp", timeout_s=2)])


def test_the_configuration_is_checked():
    with pytest.raises(ValueError, match="either `command`"):
        MCPServerConfig(label="x")
    with pytest.raises(ValueError, match="label"):
        MCPServerConfig(label="Bad Label", url="http://h/mcp")
    with pytest.raises(ConfigError, match="unique"):
        parse([{"label": "a", "url": "http://h/mcp"}, {"label": "a", "command": ["x"]}])
    with pytest.raises(ConfigError, match="NO_SUCH_VARIABLE"):
        MCPServerConfig(label="a", url="http://h/mcp", headers_from={"Authorization": "NO_SUCH_VARIABLE"}).resolved_headers()


def test_calls_share_one_connection_and_a_server_that_dies_mid_call_fails_that_call_only(tmp_path):
    registry = Registry()
    add_mcp_servers(registry, [stdio(tmp_path)])
    lookup, crash = registry.get("lookup_article"), registry.get("crash_server")
    ctx = ToolContext("acme", "u", None, "req")

    async def scenario():
        try:
            first = await lookup.call(ctx, {"topic": "warranty"})
            together = await asyncio.gather(*(lookup.call(ctx, {"topic": t}) for t in ("returns", "warranty", "nothing")))
            with pytest.raises(ToolError, match="MCP server `helpdesk`"):
                await crash.call(ctx, {"reason": "test"})
            again = await lookup.call(ctx, {"topic": "returns"})  # a new session: the server was restarted
            return first, together, again
        finally:
            await registry.close()

    first, together, again = run(scenario())
    assert "two-year warranty" in first
    assert together[0].startswith("Items can be returned") and together[2] == "No article on 'nothing'."
    assert again.startswith("Items can be returned")


def test_streamable_http_and_the_executor_confirm_a_destructive_tool_and_run_it_once(http_server, tmp_path):
    url, ledger = http_server
    registry = Registry()
    add_mcp_servers(registry, [MCPServerConfig(label="desk", url=url)])
    executor = Executor(registry, connect(sqlite_url(tmp_path / "e.db")))
    ctx = ToolContext("acme", ALICE.user, "k1", "req-1")

    async def scenario():
        try:
            read = (await executor.run([("c1", "lookup_article", '{"topic": "returns"}')], ALICE, ctx))[0]
            denied = (await executor.run([("c2", "lookup_article", '{"topic": "returns"}')], Principal("acme", "u", ("chat", "tools:support")), ctx))[0]
            invalid = (await executor.run([("c3", "lookup_article", '{"topic": 7}')], ALICE, ctx))[0]
            pending = (await executor.run([("c4", "delete_note", '{"note_id": "N-42"}')], ALICE, ctx))[0]
            approvals = await asyncio.gather(*(executor.approve(pending.action["id"], ALICE) for _ in range(5)), return_exceptions=True)
            return read, denied, invalid, pending, approvals
        finally:
            await registry.close()

    read, denied, invalid, pending, approvals = run(scenario())
    assert (read.status, read.content) == ("ok", "Items can be returned within 30 days in their original packaging.")
    assert denied.status == "denied" and invalid.status == "invalid"
    assert pending.status == "pending_confirmation"
    # Five approvals at once: one run, every approver told the same outcome.
    assert {(a["id"], a["status"]) for a in approvals} == {(pending.action["id"], "succeeded")}, approvals
    assert json.loads(approvals[0]["result"]) == {"deleted": "N-42"}
    assert ledger.read_text().splitlines() == ['{"deleted": "N-42"}']
    assert [r["status"] for r in executor.audit_rows(tool="delete_note")].count("ok") == 1


def test_a_requests_own_headers_reach_the_http_server_only_where_the_operator_allows_them(http_server, tmp_path):
    from server.errors import InvalidRequestError
    from server.toolcalls.spec import plan_tools

    url, _ = http_server
    registry = Registry()
    add_mcp_servers(registry, [MCPServerConfig(label="dir", url=url, allowed_tools=["whoami"], request_headers=["X-User-Token"])])
    executor = Executor(registry, connect(sqlite_url(tmp_path / "e.db")))
    plan = plan_tools([{"type": "server", "name": "mcp:dir", "headers": {"x-user-token": "t-alice"}}], None, None, registry, ALICE)
    assert plan.mcp_headers == {"dir": {"X-User-Token": "t-alice"}}

    async def scenario():
        try:
            own = ToolContext("acme", ALICE.user, "k1", "req-1", mcp_headers=plan.mcp_headers)
            with_token = (await executor.run([("c1", "whoami", "{}")], ALICE, own))[0]
            shared = (await executor.run([("c2", "whoami", "{}")], ALICE, ToolContext("acme", ALICE.user, "k1", "req-2")))[0]
            return with_token, shared
        finally:
            await registry.close()

    with_token, shared = run(scenario())
    assert (with_token.status, with_token.content) == ("ok", "token: t-alice")
    assert shared.content == "anonymous"  # the shared connection carries the operator's headers only
    assert "t-alice" not in json.dumps(executor.audit_rows(tool="whoami"))  # never stored
    with pytest.raises(InvalidRequestError, match="takes no header 'Cookie'") as refused:
        plan_tools([{"type": "server", "name": "mcp:dir", "headers": {"Cookie": "x"}}], None, None, registry, ALICE)
    assert refused.value.code == "unsupported_parameter"
    assert plan_tools([{"type": "server", "name": "whoami", "headers": {"X-User-Token": "t"}}], None, None, registry, ALICE).mcp_headers == {"dir": {"X-User-Token": "t"}}
    registry.add_pack("desk", [])
    with pytest.raises(InvalidRequestError, match="only for an MCP server's tools"):
        plan_tools([{"type": "server", "name": "desk", "headers": {"X-User-Token": "x"}}], None, None, registry, ALICE)
    with pytest.raises(ValueError, match="request_headers need a `url`"):
        MCPServerConfig(label="s", command=["python"], request_headers=["X-User-Token"])
