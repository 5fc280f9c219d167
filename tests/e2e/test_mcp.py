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


def _forced(client: openai.OpenAI, text: str, server_tool: str, name: str, max_tokens: int):
    """A chat turn that must call the server tool `name` (of the entry `server_tool`)."""
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        tools=[{"type": "server", "name": server_tool}],
        tool_choice={"type": "function", "function": {"name": name}},
        temperature=0,
        max_tokens=max_tokens,
    )


def _audit(live_server, tool: str) -> list[tuple]:
    with sqlite3.connect(live_server.data_dir / "enclave.db") as conn:
        return conn.execute("SELECT user, status, action_id FROM tool_audit WHERE tool = ? ORDER BY id", (tool,)).fetchall()


def _deleted(mcp_servers) -> list[str]:
    return [json.loads(line)["deleted"] for line in mcp_servers.ledger.read_text().splitlines()] if mcp_servers.ledger.exists() else []


def test_an_mcp_servers_tool_is_called_from_chat_completions_and_its_result_answers(client, live_server):
    out = _forced(client, "How long is the warranty on the dock?", "mcp:articles", "lookup_article", 60)
    calls = out.model_extra["server_tool_calls"]
    assert [(c["name"], c["status"]) for c in calls][:1] == [("lookup_article", "ok")], calls
    assert json.loads(calls[0]["arguments"])["topic"]
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content
    assert _audit(live_server, "lookup_article")[-1][1] == "ok"
    # Its constraint was compiled before ready, as a pack's is.
    ready = next(line for line in live_server.log_path.read_text().splitlines() if "tool-call constraints ready" in line)
    assert "mcp:articles" in ready and "mcp:notes" in ready


def test_a_destructive_mcp_tool_waits_for_confirmation_and_runs_exactly_once(client, live_server, mcp_servers):
    asked = _forced(client, "Delete my note N-77, please.", "mcp:notes.delete_note", "delete_note", 60)
    action = asked.model_extra["pending_action"]
    assert action and action["status"] == "pending" and action["tool"] == "delete_note", asked.model_dump()
    assert _deleted(mcp_servers).count(action["arguments"]["note_id"]) == 0  # nothing on the model's say-so
    history = [{"role": "user", "content": "Delete my note N-77."}, {"role": "assistant", "content": asked.choices[0].message.content}, {"role": "user", "content": "Yes, go ahead."}]
    done = client.chat.completions.create(model=MODEL, messages=history, tools=[{"type": "server", "name": "mcp:notes"}], temperature=0, max_tokens=40)
    assert done.model_extra["pending_action"]["status"] == "succeeded", done.model_dump()
    # The same "yes" replayed, and an operator's approval after it: no second run.
    again = client.chat.completions.create(model=MODEL, messages=history, tools=[{"type": "server", "name": "mcp:notes"}], temperature=0, max_tokens=40)
    assert again.model_extra["pending_action"]["status"] == "succeeded"
    reply = httpx.post(f"{live_server.root}/v1/actions/{action['id']}/approve", headers=live_server.headers(live_server.keys["operator"]), timeout=60)
    assert reply.status_code == 200 and reply.json()["status"] == "succeeded"
    assert _deleted(mcp_servers).count(action["arguments"]["note_id"]) == 1
    assert [row for row in _audit(live_server, "delete_note") if row[2] == action["id"] and row[1] == "ok"] == [("alice", "ok", action["id"])]


def test_an_mcp_server_that_dies_mid_call_gives_the_model_an_error_not_a_500(client):
    out = _forced(client, "Restart the help-centre index.", "mcp:notes.crash_server", "crash_server", 40)
    call = out.model_extra["server_tool_calls"][0]
    assert call["status"] == "error" and "MCP server `notes`" in json.loads(call["output"])["error"], call
    assert out.choices[0].finish_reason in ("stop", "length")
    # The next call starts the server again.
    later = _forced(client, "Delete note N-1.", "mcp:notes.delete_note", "delete_note", 40)
    assert later.model_extra["pending_action"]["status"] == "pending"


def test_a_key_without_the_servers_scope_cannot_use_its_tools(live_server):
    support = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["support"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        support.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "warranty?"}], tools=[{"type": "server", "name": "mcp:articles"}], max_tokens=5)
    assert err.value.body["code"] == "tool_not_permitted"


# ---------------------------------------------------------------- the Responses API's mcp tool


def test_the_responses_mcp_tool_lists_the_servers_tools_and_returns_its_calls(client, mcp_servers):
    tools = [{"type": "mcp", "server_label": "articles", "server_url": mcp_servers.http_url, "require_approval": "never"}]
    out = client.responses.create(
        model=MODEL,
        input="How long is the warranty on the dock?",
        tools=tools,
        tool_choice={"type": "mcp", "server_label": "articles", "name": "lookup_article"},
        max_output_tokens=60,
        temperature=0,
    )
    kinds = [i.type for i in out.output]
    assert kinds[0] == "mcp_list_tools" and kinds.index("mcp_call") < kinds.index("message"), kinds
    listed = out.output[0]
    assert listed.server_label == "articles" and [t.name for t in listed.tools] == ["lookup_article"]
    assert listed.tools[0].annotations == {"readOnlyHint": True}  # as the server itself listed it
    call = next(i for i in out.output if i.type == "mcp_call")
    assert (call.server_label, call.name, call.error) == ("articles", "lookup_article", None) and call.output
    # Streamed: the same items, as output_item events.
    with client.responses.stream(model=MODEL, input="And the returns policy?", tools=tools, tool_choice={"type": "mcp", "server_label": "articles", "name": "lookup_article"}, max_output_tokens=40, temperature=0) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.mcp_list_tools.completed" in events and "response.mcp_call.completed" in events
    assert [i.type for i in final.output][:2] == ["mcp_list_tools", "mcp_call"]


def test_an_mcp_call_waits_for_approval_runs_once_when_approved_and_not_when_denied(client, mcp_servers):
    tools = [{"type": "mcp", "server_label": "notes", "allowed_tools": ["delete_note"], "require_approval": "always"}]
    choice = {"type": "mcp", "server_label": "notes", "name": "delete_note"}
    asked = client.responses.create(model=MODEL, input="Delete my note N-88.", tools=tools, tool_choice=choice, max_output_tokens=60, temperature=0)
    request = next(i for i in asked.output if i.type == "mcp_approval_request")
    note = json.loads(request.arguments)["note_id"]
    before = _deleted(mcp_servers).count(note)
    approve = [{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}]
    done = client.responses.create(model=MODEL, previous_response_id=asked.id, input=approve, tools=tools, max_output_tokens=40, temperature=0)
    call = next(i for i in done.output if i.type == "mcp_call")
    assert call.approval_request_id == request.id and call.error is None and json.loads(call.output) == {"deleted": note}
    again = client.responses.create(model=MODEL, previous_response_id=asked.id, input=approve, tools=tools, max_output_tokens=40, temperature=0)
    assert again.output  # the replayed approval is answered, and runs nothing
    assert _deleted(mcp_servers).count(note) == before + 1

    asked = client.responses.create(model=MODEL, input="Delete my note N-99.", tools=tools, tool_choice=choice, max_output_tokens=60, temperature=0)
    request = next(i for i in asked.output if i.type == "mcp_approval_request")
    note = json.loads(request.arguments)["note_id"]
    before = _deleted(mcp_servers).count(note)
    deny = [{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": False}]
    denied = client.responses.create(model=MODEL, previous_response_id=asked.id, input=deny, tools=tools, max_output_tokens=40, temperature=0)
    assert "nothing was done" in denied.output_text and not [i for i in denied.output if i.type == "mcp_call"]
    assert _deleted(mcp_servers).count(note) == before


def test_a_request_sends_its_own_headers_where_the_operator_allows_and_they_are_not_kept(client, mcp_servers):
    # The operator lets a request set X-User-Token for `directory` (conftest): each call
    # of this request carries it; the response (stored) does not echo it.
    tools = [{"type": "mcp", "server_label": "directory", "headers": {"X-User-Token": "t-e2e-7"}, "require_approval": "never"}]
    out = client.responses.create(
        model=MODEL, input="Who am I signed in as?", tools=tools, tool_choice={"type": "mcp", "server_label": "directory", "name": "whoami"}, max_output_tokens=30, temperature=0
    )
    call = next(i for i in out.output if i.type == "mcp_call")
    assert (call.name, call.output, call.error) == ("whoami", "token: t-e2e-7", None)
    # (The test server's answer repeats the token: outside the tool's output, it is nowhere.)
    stored = client.responses.retrieve(out.id)
    for response in (out, stored):
        assert response.model_dump()["tools"][0].get("headers") is None
        assert "t-e2e-7" not in response.model_dump_json(exclude={"output", "server_tool_calls"})
    # Without headers, the shared connection: the operator's credentials only.
    plain = client.responses.create(
        model=MODEL,
        input="Who am I signed in as?",
        tools=[{"type": "mcp", "server_label": "directory", "require_approval": "never"}],
        tool_choice={"type": "mcp", "server_label": "directory", "name": "whoami"},
        max_output_tokens=30,
        temperature=0,
    )
    assert next(i for i in plain.output if i.type == "mcp_call").output == "anonymous"


@pytest.mark.parametrize(
    ("tool", "code"),
    [
        ({"type": "mcp", "server_label": "anywhere", "server_url": "http://mcp.example.com/mcp"}, "mcp_server_not_allowed"),
        ({"type": "mcp", "server_label": "articles", "server_url": "http://mcp.example.com/mcp"}, "mcp_server_not_allowed"),
        ({"type": "mcp", "server_label": "articles", "headers": {"Authorization": "Bearer x"}}, "unsupported_parameter"),
        ({"type": "mcp", "server_label": "directory", "headers": {"Cookie": "session=1"}}, "unsupported_parameter"),
        ({"type": "mcp", "server_label": "directory", "authorization": "t"}, "unsupported_parameter"),
        ({"type": "mcp", "server_label": "articles", "allowed_tools": ["drop_everything"]}, "tool_not_found"),
    ],
)
def test_only_the_operators_mcp_servers_can_be_used(client, tool, code):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="hi", tools=[tool], max_output_tokens=5)
    assert err.value.body["code"] == code
