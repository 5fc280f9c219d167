"""Tool calling against the live server: constrained calls in every mode, server-side
tools, confirmations, failures and scopes."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from server.toolcalls.tenancy import tenant_database

SCHEMAS: dict[str, tuple[str, dict]] = {
    "get_weather": (
        "What will the weather be in Paris over the next 3 days, in celsius?",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    ),
    "book_flight": (
        "Book a flight from LHR to JFK on 2026-12-24 for 2 passengers.",
        {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["origin", "destination", "date", "passengers"],
            "additionalProperties": False,
        },
    ),
    "set_thermostat": (
        "Set the living room to 21.5 degrees in heating mode.",
        {
            "type": "object",
            "properties": {"temperature": {"type": "number", "minimum": 10, "maximum": 30}, "mode": {"enum": ["heat", "cool", "auto"]}},
            "required": ["temperature", "mode"],
            "additionalProperties": False,
        },
    ),
    "create_event": (
        "Create a meeting called Budget review with ana and li.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "attendees": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,12}$"}, "minItems": 1, "maxItems": 3},
            },
            "required": ["title", "attendees"],
        },
    ),
    "search_products": (
        "Find running shoes under 120 dollars that are in stock.",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 40},
                "filters": {
                    "type": "object",
                    "properties": {"max_price": {"type": "number", "minimum": 0, "maximum": 1000}, "in_stock": {"type": "boolean"}},
                    "required": ["in_stock"],
                    "additionalProperties": False,
                },
            },
            "required": ["query", "filters"],
        },
    ),
    "send_invoice": (
        "Invoice customer C1234 (Dana) for 3 units of SKU-001.",
        {
            "type": "object",
            "properties": {
                "customer": {
                    "type": "object",
                    "properties": {"id": {"type": "string", "pattern": "^C[0-9]{4}$"}, "name": {"type": "string", "maxLength": 20}},
                    "required": ["id"],
                },
                "lines": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string", "pattern": "^SKU-[0-9]{3}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 100}},
                        "required": ["sku", "qty"],
                    },
                    "minItems": 1,
                    "maxItems": 2,
                },
            },
            "required": ["customer", "lines"],
        },
    ),
    "toggle_feature": (
        "Turn the dark_mode feature on.",
        {
            "type": "object",
            "properties": {"feature": {"enum": ["dark_mode", "beta_search", "new_billing"]}, "enabled": {"type": "boolean"}},
            "required": ["feature", "enabled"],
            "additionalProperties": False,
        },
    ),
    "rate_answer": (
        "Rate the last answer minus two, it was poor.",
        {
            "type": "object",
            "properties": {"score": {"type": "integer", "minimum": -5, "maximum": 5}, "comment": {"type": "string", "maxLength": 30}},
            "required": ["score"],
        },
    ),
    "convert_currency": (
        "Convert 250 euros to US dollars.",
        {
            "type": "object",
            "properties": {
                "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000},
                "source": {"enum": ["EUR", "USD", "GBP"]},
                "target": {"enum": ["EUR", "USD", "GBP"]},
            },
            "required": ["amount", "source", "target"],
        },
    ),
    "get_time": ("What time is it?", {"type": "object", "properties": {}}),
    "find_user": (
        "Look up user 42.",
        {"type": "object", "properties": {"user": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^u_[a-z]{3,8}$"}]}}, "required": ["user"]},
    ),
}
MODES = ["auto", "required", "named"]


def _tools(name: str) -> list[dict]:
    return [{"type": "function", "function": {"name": name, "description": f"{name.replace('_', ' ')}", "parameters": SCHEMAS[name][1]}}]


def _ask(client: openai.OpenAI, name: str, mode: str, stream: bool, parallel: bool = True) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) for one request, streamed or not."""
    choice = {"type": "function", "function": {"name": name}} if mode == "named" else mode
    kwargs = dict(
        model="smollm2",
        messages=[{"role": "user", "content": SCHEMAS[name][0]}],
        tools=_tools(name),
        tool_choice=choice,
        parallel_tool_calls=parallel,
        temperature=0,
        max_tokens=256,
    )
    if not stream:
        out = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in out.message.tool_calls or []]
        return out.message.content, calls, out.finish_reason
    content, names, args, finish = "", {}, {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.function.name:  # the name comes first, exactly once
                assert call.index not in names and call.id
                names[call.index] = call.function.name
            args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [(names[i], args[i]) for i in sorted(names)], finish


def test_tool_arguments_match_the_schema_in_every_mode(client):
    cases = [(name, mode, stream) for name in SCHEMAS for mode in MODES for stream in (False, True)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: (case, _ask(client, *case)), cases))
    called = 0
    for (name, mode, stream), (content, calls, finish) in results:
        where = f"{name} {mode} stream={stream}: {content!r} {calls} {finish}"
        if mode != "auto" or calls:
            assert calls and finish == "tool_calls", where
            for tool_name, arguments in calls:
                assert tool_name == name, where
                jsonschema.validate(json.loads(arguments), SCHEMAS[name][1])
            called += 1
        else:
            assert content and not content.startswith("["), where
    assert called >= len(SCHEMAS) * 4  # required and named, both transports, always call


def test_parallel_tool_calls_false_gives_one_call(client):
    for stream in (False, True):
        _, calls, finish = _ask(client, "get_weather", "required", stream, parallel=False)
        assert len(calls) == 1 and finish == "tool_calls"


def test_tool_result_is_accepted_on_the_next_request(client):
    first = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": SCHEMAS["get_weather"][0]}], tools=_tools("get_weather"), tool_choice="required", temperature=0, max_tokens=128
    )
    message = first.choices[0].message
    history = [
        {"role": "user", "content": SCHEMAS["get_weather"][0]},
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"forecast": "sunny, 18 C"}'},
    ]
    second = client.chat.completions.create(model="smollm2", messages=history, tools=_tools("get_weather"), tool_choice="none", temperature=0, max_tokens=40)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_tool_message_without_matching_call_is_rejected(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "{}"}], max_tokens=5
        )
    assert err.value.body["param"] == "messages.1.tool_call_id"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(?=A)[A-Z]+$"}}},
        {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}}},
        # Refused by design, the same on every machine, rather than by a compile timer.
        {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(a+)+$"}}},
        {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]{500}$"}}},
    ],
)
def test_schema_that_cannot_compile_gets_400_naming_the_tool(client, schema):
    tools = [{"type": "function", "function": {"name": "weird_tool", "parameters": schema}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], tools=tools, max_tokens=5)
    assert err.value.body["code"] == "invalid_tool_schema" and "weird_tool" in err.value.body["message"]


# ---------------------------------------------------------------- server-side tools


@pytest.fixture(scope="module")
def support(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["support"], max_retries=0, timeout=120)


def _support_db(live_server, tenant: str = "acme") -> sqlite3.Connection:
    return sqlite3.connect(tenant_database(live_server.data_dir / "packs", "support", tenant))


def _audit(live_server, tool: str) -> list[tuple]:
    with sqlite3.connect(live_server.data_dir / "enclave.db") as conn:
        return conn.execute("SELECT user, status, arguments, action_id FROM tool_audit WHERE tool = ? ORDER BY id", (tool,)).fetchall()


SUPPORT = [{"type": "server", "name": "support"}]


def test_the_support_packs_constraint_was_compiled_before_ready(live_server):
    # The server compiled it at start-up (server/toolcalls/precompile.py): the first
    # user of the pack does not pay for it.
    assert "tool-call constraints ready: support" in live_server.log_path.read_text()


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def test_conversation_looks_up_a_ticket_and_answers_from_it(support, live_server):
    out = support.chat.completions.create(
        model="smollm2",
        messages=[{"role": "system", "content": "You are a support assistant."}, {"role": "user", "content": "What is the status of my ticket T-1001?"}],
        tools=SUPPORT,
        tool_choice=_named("lookup_ticket"),
        temperature=0,
        max_tokens=120,
    )
    calls = out.model_extra["server_tool_calls"]
    assert [c["name"] for c in calls] == ["lookup_ticket"] and calls[0]["status"] == "ok"
    assert "USB-C dock" in calls[0]["output"]
    answer = out.choices[0].message.content.lower()
    assert out.choices[0].finish_reason == "stop" and any(fact in answer for fact in ("open", "dock", "ord-5002", "damaged"))
    assert _audit(live_server, "lookup_ticket")[-1][:2] == ("cust_1001", "ok")


def test_another_customers_ticket_stays_hidden(support):
    out = support.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Show me ticket T-1003."}], tools=SUPPORT, tool_choice=_named("lookup_ticket"), temperature=0, max_tokens=60
    )
    call = out.model_extra["server_tool_calls"][0]
    assert call["status"] == "error" and "Cannot add seats" not in json.dumps(out.model_dump())


def _ask_refund(support, text: str):
    return support.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": text}], tools=SUPPORT, tool_choice=_named("create_refund"), temperature=0, max_tokens=120
    )


def _refunds(live_server, order: str) -> int:
    with _support_db(live_server) as conn:
        return conn.execute("SELECT COUNT(*) FROM refunds WHERE order_id = ?", (order,)).fetchone()[0]


def test_refund_waits_for_confirmation_and_runs_once_under_concurrent_approvals(support, live_server):
    out = _ask_refund(support, "My USB-C dock from order ORD-5002 arrived damaged. Please refund 20 EUR.")
    action = out.model_extra["pending_action"]
    assert action and action["status"] == "pending" and action["tool"] == "create_refund", out.model_dump()
    assert action["id"] in out.choices[0].message.content and "ORD-5002" in action["summary"]
    assert _refunds(live_server, "ORD-5002") == 0  # nothing happens on the model's say-so

    url = f"{live_server.root}/v1/actions/{action['id']}/approve"
    headers = live_server.headers(live_server.keys["operator"])
    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(lambda _: httpx.post(url, headers=headers, timeout=60), range(20)))
    assert {r.status_code for r in replies} == {200}
    bodies = [r.json() for r in replies]
    assert {b["status"] for b in bodies} == {"succeeded"}
    assert len({json.dumps(b["result"], sort_keys=True) for b in bodies}) == 1
    assert _refunds(live_server, "ORD-5002") == 1
    executed = [row for row in _audit(live_server, "create_refund") if row[3] == action["id"] and row[1] == "ok"]
    assert len(executed) == 1

    # A user "yes" replayed after the operator approved does not run it again.
    history = [{"role": "user", "content": "refund please"}, {"role": "assistant", "content": out.choices[0].message.content}, {"role": "user", "content": "yes"}]
    again = support.chat.completions.create(model="smollm2", messages=history, tools=SUPPORT, temperature=0, max_tokens=40)
    assert again.model_extra["pending_action"]["status"] == "succeeded"
    assert _refunds(live_server, "ORD-5002") == 1


def test_user_confirms_or_declines_in_the_conversation(support, live_server):
    asked = _ask_refund(support, "Refund 10 EUR on order ORD-5001, I was charged twice.")
    action = asked.model_extra["pending_action"]
    assert action and action["status"] == "pending", asked.model_dump()
    history = [{"role": "user", "content": "Refund 10 EUR on order ORD-5001."}, {"role": "assistant", "content": asked.choices[0].message.content}]
    before = _refunds(live_server, "ORD-5001")
    done = support.chat.completions.create(model="smollm2", messages=history + [{"role": "user", "content": "Yes, go ahead."}], tools=SUPPORT, temperature=0, max_tokens=60)
    assert done.model_extra["pending_action"]["status"] == "succeeded" and done.choices[0].message.content
    assert _refunds(live_server, "ORD-5001") == before + 1

    asked = _ask_refund(support, "Refund 10 EUR on order ORD-5002, it arrived damaged.")
    assert asked.model_extra["pending_action"], asked.model_dump()
    history = [{"role": "user", "content": "Refund 10 EUR."}, {"role": "assistant", "content": asked.choices[0].message.content}, {"role": "user", "content": "No, leave it."}]
    declined = support.chat.completions.create(model="smollm2", messages=history, tools=SUPPORT, temperature=0, max_tokens=40)
    assert declined.model_extra["pending_action"]["status"] == "cancelled" and "nothing was done" in declined.choices[0].message.content
    assert _refunds(live_server, "ORD-5001") == before + 1
    reply = httpx.post(f"{live_server.root}/v1/actions/{asked.model_extra['pending_action']['id']}/approve", headers=live_server.headers(live_server.keys["operator"]))
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "action_cancelled"


def test_refund_of_another_customers_order_is_refused_before_confirmation(support, live_server):
    out = _ask_refund(support, "Refund 10 EUR on order ORD-5003.")
    calls = out.model_extra["server_tool_calls"]
    assert out.model_extra["pending_action"] is None
    tried = [c for c in calls if "ORD-5003" in c["arguments"]]
    assert tried and all(c["status"] == "error" and "no order ORD-5003" in c["output"] for c in tried), calls
    assert _refunds(live_server, "ORD-5003") == 0


def test_failing_and_slow_tools_do_not_break_the_turn(client, live_server):
    for tool, status in (("always_fails", "error"), ("too_slow", "timeout")):
        out = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Is the item lamp available?"}],
            tools=[{"type": "server", "name": f"faulty_tools.{tool}"}],
            tool_choice=_named(tool),
            temperature=0,
            max_tokens=40,
        )
        call = out.model_extra["server_tool_calls"][0]
        assert call["status"] == status and "error" in json.loads(call["output"])
        assert out.choices[0].finish_reason in ("stop", "length") and out.choices[0].message.content
    assert _audit(live_server, "always_fails")[-1][1] == "error"


def test_key_without_the_scope_cannot_run_server_tools(live_server):
    chat_only = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["chat_only"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        chat_only.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "ticket T-1003?"}], tools=SUPPORT, max_tokens=5)
    assert err.value.body["code"] == "tool_not_permitted"
    reply = httpx.post(f"{live_server.root}/v1/actions/act_000000000000000000000000/approve", headers=live_server.headers(live_server.keys["support"]))
    assert reply.status_code == 403


def test_unknown_server_tool_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], tools=[{"type": "server", "name": "nope"}], max_tokens=5)
    assert err.value.body["code"] == "tool_not_found"
