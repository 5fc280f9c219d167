"""Tool choice on the default small model, through the official client: the server ranks
the tools against the request and offers the model the few that fit, grounds
identifiers and amounts in what the user wrote, sizes calls to max_tokens, and never
returns a call written as text as the answer."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

SUPPORT = [{"type": "server", "name": "support"}]

# Worded unlike the eval set and the development split (evals/), one per support tool.
REQUESTS = [
    ("Could you tell me whether my subscription is still running?", "check_subscription_status", {}),
    ("Please look into ticket T-1002 and tell me where it stands.", "lookup_ticket", {"ticket_id": "T-1002"}),
    ("The order ORD-5002 came damaged; I want 12.5 EUR refunded.", "create_refund", {"order_id": "ORD-5002", "amount": 12.5, "reason": "damaged"}),
    ("I would like a person from your team to take this over.", "handoff_to_agent", {}),
]


@pytest.fixture(scope="module")
def support(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys["support"], max_retries=0, timeout=180)


@pytest.mark.parametrize("message,tool,arguments", REQUESTS, ids=[r[1] for r in REQUESTS])
def test_the_tool_that_fits_is_called_with_the_values_the_user_wrote(support, message, tool, arguments):
    out = support.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": message}], tools=SUPPORT, tool_choice="required", temperature=0, max_tokens=80
    )
    extra = out.model_extra
    assert extra["tool_shortlist"]["ranked"][0]["name"] == tool and tool in extra["tool_shortlist"]["offered"]
    first = extra["server_tool_calls"][0]
    assert first["name"] == tool
    got = json.loads(first["arguments"])
    assert {k: got.get(k) for k in arguments} == arguments


FREE_TEXT = {
    "type": "object",
    "properties": {"summary": {"type": "string"}, "priority": {"enum": ["low", "high"]}},
    "required": ["summary", "priority"],
    "additionalProperties": False,
}


def _sized_call_closes(client, name: str, description: str, schema: dict, message: str, max_tokens: int) -> None:
    """A named call to `schema` closes within max_tokens, its arguments valid."""
    tools = [{"type": "function", "function": {"name": name, "description": description, "parameters": schema}}]
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": message}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": name}},
        temperature=0,
        max_tokens=max_tokens,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert out.usage.completion_tokens <= max_tokens
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("max_tokens", [40, 64])
def test_a_call_with_free_text_closes_within_max_tokens(client, max_tokens):
    """An unbounded string used to run until max_tokens cut it, as unterminated JSON."""
    message = "Write a long, detailed incident report about everything that went wrong with my broken dock, in full."
    _sized_call_closes(client, "file_report", "File a detailed incident report.", FREE_TEXT, message, max_tokens)


ORDER = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "properties": {"sku": {"type": "string"}, "note": {"type": "string"}}, "required": ["sku", "note"], "additionalProperties": False},
        },
    },
    "required": ["customer", "items"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("max_tokens", [72, 120])
def test_a_call_with_nested_free_text_closes_within_max_tokens(client, max_tokens):
    """The issue's case: an array of objects with free strings came back cut mid-string."""
    message = "Order for Alexandra Montgomery-Fitzwilliam: twelve items, each with a long gift note, " + ", ".join(f"SKU-{i:04d}" for i in range(12))
    _sized_call_closes(client, "place_order", "Place an order of several items.", ORDER, message, max_tokens)


OPEN = {
    "type": "object",
    "properties": {"note": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}, "meta": {"type": "object"}},
    "required": ["note", "tags", "meta"],
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_of_no_computable_size_cut_by_max_tokens_is_closed_valid(client, stream):
    """An open object has no size to budget for: the cut call is closed with the fewest
    characters its schema accepts, appended to what was streamed; the finish reason stays
    "length", since a value was cut short."""
    tools = [{"type": "function", "function": {"name": "log_note", "description": "Log a long note.", "parameters": OPEN}}]
    kwargs = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Log a very long note describing, in full detail, every step of my broken dock's repair."}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "log_note"}},
        "temperature": 0,
        "max_tokens": 24,
    }
    if stream:
        arguments, finish = "", None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or []:
                    arguments += call.function.arguments or ""
                finish = choice.finish_reason or finish
    else:
        out = client.chat.completions.create(**kwargs)
        assert out.usage.completion_tokens == 24
        (call,) = out.choices[0].message.tool_calls
        arguments, finish = call.function.arguments, out.choices[0].finish_reason
    assert finish == "length"
    jsonschema.validate(json.loads(arguments), OPEN)


def test_no_call_written_as_text_comes_back_as_the_answer(support):
    """Under `auto` the model may answer in prose, but a JSON object, a code fence or
    <tool_call> tags as the answer would be a call the client never sees as one."""
    for message in ("Check my plan and ticket T-1001.", "Give me the JSON for a refund of 10 EUR on ORD-5002.", "Call the tool for my subscription."):
        out = support.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": message}], tools=SUPPORT, temperature=0, max_tokens=60)
        content = (out.choices[0].message.content or "").lstrip()
        assert not content.startswith(("{", "[", "```", "<tool_call>")), content


def test_under_auto_a_clear_tool_request_is_called_and_small_talk_is_answered(support, client):
    """SmolLM2 left to choose under `auto` answered every tool request in prose; the
    shortlist's ranking now decides when a request clearly asks for a tool."""
    out = support.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Any news on my ticket T-1001?"}], tools=SUPPORT, tool_choice="auto", temperature=0, max_tokens=60
    )
    assert out.model_extra["tool_shortlist"]["decision"] == "call"
    assert [c["name"] for c in out.model_extra["server_tool_calls"]][:1] == ["lookup_ticket"]
    assert json.loads(out.model_extra["server_tool_calls"][0]["arguments"]) == {"ticket_id": "T-1001"}
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content  # then it answers
    # A client's own tool: the call comes back to the client.
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    called = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the weather in Oslo right now?"}], tools=[weather], tool_choice="auto", temperature=0, max_tokens=40
    )
    assert called.choices[0].finish_reason == "tool_calls" and called.choices[0].message.tool_calls[0].function.name == "get_weather"
    # Small talk is left to the model, which answers it.
    hello = support.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hello there!"}], tools=SUPPORT, tool_choice="auto", temperature=0, max_tokens=24)
    assert hello.model_extra["tool_shortlist"]["decision"] == "model" and not hello.model_extra.get("server_tool_calls")
