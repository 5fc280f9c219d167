"""MCP tools end to end: the live server on the real engine calls a real MCP server's
tools (tests/mcp_servers/helpdesk.py), one over streamable HTTP and one as its own stdio
child (tests/e2e/conftest.py), through the official `openai` client."""

from __future__ import annotations

import json
import sqlite3

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2"


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def _audit(live_server, tool: str) -> list[tuple]:
    with sqlite3.connect(live_server.data_dir / "enclave.db") as conn:
        return conn.execute("SELECT user, status, action_id FROM tool_audit WHERE tool = ? ORDER BY id", (tool,)).fetchall()


def _deleted(mcp_servers) -> list[str]:
    return [json.loads(line)["deleted"] for line in mcp_servers.ledger.read_text().splitlines()] if mcp_servers.ledger.exists() else []


def test_an_mcp_servers_tool_is_called_from_chat_completions_and_its_result_answers(client, live_server):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "How long is the warranty on the dock?"}],
        tools=[{"type": "server", "name": "mcp:articles"}],
        tool_choice=_named("lookup_article"),
        temperature=0,
        max_tokens=60,
    )
    calls = out.model_extra["server_tool_calls"]
    assert [(c["name"], c["status"]) for c in calls][:1] == [("lookup_article", "ok")], calls
    assert json.loads(calls[0]["arguments"])["topic"]
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content
    assert _audit(live_server, "lookup_article")[-1][1] == "ok"
    assert "tool-call constraints ready" in live_server.log_path.read_text()


def test_a_destructive_mcp_tool_waits_for_confirmation_and_runs_exactly_once(live_server, mcp_servers):
    notes = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.key, max_retries=0, timeout=120)
    asked = notes.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Delete my note N-77, please."}],
        tools=[{"type": "server", "name": "mcp:notes.delete_note"}],
        tool_choice=_named("delete_note"),
        temperature=0,
        max_tokens=60,
    )
    action = asked.model_extra["pending_action"]
    assert action and action["status"] == "pending" and action["tool"] == "delete_note", asked.model_dump()
    assert _deleted(mcp_servers).count(action["arguments"]["note_id"]) == 0  # nothing on the model's say-so
    history = [{"role": "user", "content": "Delete my note N-77."}, {"role": "assistant", "content": asked.choices[0].message.content}, {"role": "user", "content": "Yes, go ahead."}]
    done = notes.chat.completions.create(model=MODEL, messages=history, tools=[{"type": "server", "name": "mcp:notes"}], temperature=0, max_tokens=40)
    assert done.model_extra["pending_action"]["status"] == "succeeded", done.model_dump()
    # The same "yes" replayed, and an operator's approval after it: no second run.
    again = notes.chat.completions.create(model=MODEL, messages=history, tools=[{"type": "server", "name": "mcp:notes"}], temperature=0, max_tokens=40)
    assert again.model_extra["pending_action"]["status"] == "succeeded"
    reply = httpx.post(f"{live_server.root}/v1/actions/{action['id']}/approve", headers=live_server.headers(live_server.keys["operator"]), timeout=60)
    assert reply.status_code == 200 and reply.json()["status"] == "succeeded"
    assert _deleted(mcp_servers).count(action["arguments"]["note_id"]) == 1
    assert [row for row in _audit(live_server, "delete_note") if row[2] == action["id"] and row[1] == "ok"] == [("alice", "ok", action["id"])]


def test_an_mcp_server_that_dies_mid_call_gives_the_model_an_error_not_a_500(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Restart the help-centre index."}],
        tools=[{"type": "server", "name": "mcp:notes.crash_server"}],
        tool_choice=_named("crash_server"),
        temperature=0,
        max_tokens=40,
    )
    call = out.model_extra["server_tool_calls"][0]
    assert call["status"] == "error" and "MCP server `notes`" in json.loads(call["output"])["error"], call
    assert out.choices[0].finish_reason in ("stop", "length")
    # The next call starts the server again.
    later = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Delete note N-1."}],
        tools=[{"type": "server", "name": "mcp:notes.delete_note"}],
        tool_choice=_named("delete_note"),
        temperature=0,
        max_tokens=40,
    )
    assert later.model_extra["pending_action"]["status"] == "pending"


def test_a_key_without_the_servers_scope_cannot_use_its_tools(live_server):
    support = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["support"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        support.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "warranty?"}], tools=[{"type": "server", "name": "mcp:articles"}], max_tokens=5)
    assert err.value.body["code"] == "tool_not_permitted"
