"""The Responses API against the Open Responses specification (openresponses.org), on
the live server with plain HTTP, so nothing a client SDK forgives is forgiven here.

The schemas below are written from the spec's own: `ResponseResource` with every field
it requires, the output items the server produces (message, function_call), function
tools as echoed (with `strict`), usage; and the streaming rules: sequence numbers from
0 upwards, `response.created` then `response.in_progress` first, every snapshot a whole
ResponseResource, and exactly one terminal event, last, that names the outcome
(`response.completed`, `response.incomplete` or `response.failed`) and agrees with the
status of the response it carries. Cases: basic, streamed, system prompt, tool calling
(streamed and not), multi-turn, and a truncated answer.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_INT = {"type": ["integer", "null"]}

OUTPUT_TEXT = {
    "type": "object",
    "required": ["type", "text", "annotations"],
    "properties": {"type": {"const": "output_text"}, "text": {"type": "string"}, "annotations": {"type": "array"}, "logprobs": {"type": "array"}},
}
MESSAGE = {
    "type": "object",
    "required": ["type", "id", "status", "role", "content"],
    "properties": {
        "type": {"const": "message"},
        "id": {"type": "string", "minLength": 1},
        "status": {"enum": ["in_progress", "completed", "incomplete"]},
        "role": {"const": "assistant"},
        "content": {"type": "array", "items": OUTPUT_TEXT},
    },
}
FUNCTION_CALL = {
    "type": "object",
    "required": ["type", "id", "call_id", "name", "arguments", "status"],
    "properties": {
        "type": {"const": "function_call"},
        "id": {"type": "string", "minLength": 1},
        "call_id": {"type": "string", "minLength": 1},
        "name": {"type": "string"},
        "arguments": {"type": "string"},
        "status": {"enum": ["in_progress", "completed", "incomplete"]},
    },
}
FUNCTION_TOOL = {
    "type": "object",
    "required": ["type", "name", "description", "parameters", "strict"],
    "properties": {"type": {"const": "function"}, "name": {"type": "string"}, "description": NULLABLE_STRING, "parameters": {"type": ["object", "null"]}, "strict": {"type": ["boolean", "null"]}},
}
USAGE = {
    "type": "object",
    "required": ["input_tokens", "output_tokens", "total_tokens", "input_tokens_details", "output_tokens_details"],
    "properties": {
        "input_tokens": {"type": "integer", "minimum": 0},
        "output_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
        "input_tokens_details": {"type": "object", "required": ["cached_tokens"]},
        "output_tokens_details": {"type": "object", "required": ["reasoning_tokens"]},
    },
}
RESPONSE_RESOURCE = {
    "type": "object",
    "required": [
        "id", "object", "created_at", "completed_at", "status", "incomplete_details", "model", "previous_response_id",
        "instructions", "output", "error", "tools", "tool_choice", "truncation", "parallel_tool_calls", "text", "top_p",
        "presence_penalty", "frequency_penalty", "top_logprobs", "temperature", "reasoning", "user", "usage",
        "max_output_tokens", "max_tool_calls", "store", "background", "service_tier", "metadata", "safety_identifier",
        "prompt_cache_key",
    ],
    "properties": {
        "id": {"type": "string", "pattern": "^resp_"},
        "object": {"const": "response"},
        "created_at": {"type": "integer"},
        "completed_at": NULLABLE_INT,
        "status": {"enum": ["in_progress", "completed", "incomplete", "failed", "queued", "cancelled"]},
        "incomplete_details": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["reason"]}]},
        "model": {"type": "string"},
        "previous_response_id": NULLABLE_STRING,
        "instructions": {"type": ["string", "array", "null"]},
        "output": {"type": "array", "items": {"oneOf": [MESSAGE, FUNCTION_CALL, {"type": "object", "properties": {"type": {"const": "file_search_call"}}, "required": ["type"]}]}},
        "error": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["code", "message"]}]},
        "tools": {"type": "array", "items": {"if": {"properties": {"type": {"const": "function"}}}, "then": FUNCTION_TOOL}},
        "tool_choice": {"type": ["string", "object"]},
        "truncation": {"enum": ["auto", "disabled"]},
        "parallel_tool_calls": {"type": "boolean"},
        "text": {"type": "object", "required": ["format"]},
        "top_p": {"type": "number"},
        "presence_penalty": {"type": "number"},
        "frequency_penalty": {"type": "number"},
        "top_logprobs": {"type": "integer"},
        "temperature": {"type": "number"},
        "reasoning": {"type": ["object", "null"]},
        "user": NULLABLE_STRING,
        "usage": {"anyOf": [{"type": "null"}, USAGE]},
        "max_output_tokens": NULLABLE_INT,
        "max_tool_calls": NULLABLE_INT,
        "store": {"type": "boolean"},
        "background": {"type": "boolean"},
        "service_tier": {"type": "string"},
        "metadata": {"type": "object"},
        "safety_identifier": NULLABLE_STRING,
        "prompt_cache_key": NULLABLE_STRING,
    },
}
SNAPSHOTS = {"response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"}
TERMINAL = {"response.completed": "completed", "response.incomplete": "incomplete", "response.failed": "failed"}
LOOKUP = {
    "type": "function",
    "name": "lookup_order",
    "description": "Look up an order by its id.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}}, "required": ["order_id"]},
}


def check_resource(body: dict[str, Any]) -> None:
    jsonschema.validate(body, RESPONSE_RESOURCE)
    status = body["status"]
    assert (body["completed_at"] is not None) == (status in ("completed", "incomplete")), body
    assert (body["incomplete_details"] is not None) == (status == "incomplete"), body
    assert (body["error"] is not None) == (status == "failed"), body
    if status in ("completed", "incomplete"):
        assert body["completed_at"] >= body["created_at"] and body["usage"] is not None
    if status == "completed":
        assert all(item["status"] == "completed" for item in body["output"] if item["type"] in ("message", "function_call")), body["output"]


def create(server, **body) -> dict[str, Any]:
    r = httpx.post(f"{server.base_url}/responses", json={"model": MODEL, "temperature": 0, **body}, headers=server.headers(), timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, **body) -> list[tuple[str, dict[str, Any]]]:
    """The raw SSE stream as (event name, data) pairs, each checked against the rules."""
    events: list[tuple[str, dict[str, Any]]] = []
    payload = {"model": MODEL, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", f"{server.base_url}/responses", json=payload, headers=server.headers(), timeout=180) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == name, (name, data)
                events.append((name, data))
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    terminal = [k for k in kinds if k in TERMINAL]
    assert len(terminal) == 1 and kinds[-1] == terminal[0], kinds
    for kind, data in events:
        if kind in SNAPSHOTS:
            check_resource(data["response"])
        if kind in ("response.output_item.added", "response.output_item.done"):
            jsonschema.validate(data["item"], {"oneOf": [MESSAGE, FUNCTION_CALL]})
            assert isinstance(data["output_index"], int)
        if kind == "response.output_item.done":
            assert data["item"]["status"] in ("completed", "incomplete")
        if kind in ("response.output_text.delta", "response.output_text.done"):
            assert {"item_id", "output_index", "content_index"} <= set(data)
    final = events[-1][1]["response"]
    assert final["status"] == TERMINAL[kinds[-1]]
    # Each item as it was done is the item in the final snapshot, status included.
    done = {d["item"]["id"]: d["item"] for k, d in events if k == "response.output_item.done"}
    assert [done[i["id"]] for i in final["output"] if i["id"] in done] == [i for i in final["output"] if i["id"] in done]
    ids = {d["response"]["id"] for k, d in events if k in SNAPSHOTS}
    assert len(ids) == 1
    return events


def text_of(body: dict[str, Any]) -> str:
    return "".join(part["text"] for item in body["output"] if item["type"] == "message" for part in item["content"])


def test_basic_response(live_server):
    body = create(live_server, input="Where is my order? It has not arrived.", max_output_tokens=24)
    check_resource(body)
    assert body["status"] in ("completed", "incomplete") and body["output"][0]["type"] == "message"
    # What the server stored is what it returned.
    stored = httpx.get(f"{live_server.base_url}/responses/{body['id']}", headers=live_server.headers(), timeout=30).json()
    check_resource(stored)
    assert stored["output"] == body["output"] and stored["completed_at"] == body["completed_at"]


def test_streamed_response_adds_up_to_its_final_snapshot(live_server):
    events = stream(live_server, input="How long does delivery take?", max_output_tokens=24)
    deltas = "".join(d["delta"] for k, d in events if k == "response.output_text.delta")
    assert deltas and deltas == text_of(events[-1][1]["response"])


def test_system_prompt_is_echoed_and_used(live_server):
    instructions = "You are the support desk of Acme. Answer in one short sentence."
    body = create(live_server, instructions=instructions, input="What are your opening hours?", max_output_tokens=24)
    check_resource(body)
    assert body["instructions"] == instructions and text_of(body)


def test_tool_calling_echoes_strict_function_tools(live_server):
    body = create(live_server, input="Where is order ORD-5002?", tools=[LOOKUP], tool_choice="required", max_output_tokens=64)
    check_resource(body)
    calls = [i for i in body["output"] if i["type"] == "function_call"]
    assert calls and calls[0]["name"] == "lookup_order" and json.loads(calls[0]["arguments"])["order_id"]
    assert body["tools"] == [{**LOOKUP, "strict": True}]
    strict_false = create(live_server, input="Where is order ORD-5002?", tools=[{**LOOKUP, "strict": False}], tool_choice="required", max_output_tokens=64)
    assert strict_false["tools"][0]["strict"] is False


def test_streamed_tool_calling(live_server):
    events = stream(live_server, input="Where is order ORD-5002?", tools=[LOOKUP], tool_choice="required", max_output_tokens=64)
    kinds = [k for k, _ in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    final = events[-1][1]["response"]
    done = [d["item"] for k, d in events if k == "response.output_item.done" and d["item"]["type"] == "function_call"]
    assert done and done == [i for i in final["output"] if i["type"] == "function_call"]


def test_multi_turn_with_previous_response_and_a_tool_result(live_server):
    first = create(live_server, input="Where is order ORD-5002?", tools=[LOOKUP], tool_choice="required", max_output_tokens=64)
    call = next(i for i in first["output"] if i["type"] == "function_call")
    second = create(
        live_server,
        previous_response_id=first["id"],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": json.dumps({"status": "shipped"})}],
        tools=[LOOKUP],
        max_output_tokens=32,
    )
    check_resource(second)
    assert second["previous_response_id"] == first["id"]
    third = create(live_server, previous_response_id=second["id"], input="Thanks. When will it arrive?", max_output_tokens=24)
    check_resource(third)


def test_a_truncated_answer_is_incomplete_and_ends_with_response_incomplete(live_server):
    body = create(live_server, input="Explain in detail how refunds for damaged parcels work.", max_output_tokens=3)
    check_resource(body)
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    events = stream(live_server, input="Explain in detail how refunds for damaged parcels work.", max_output_tokens=3)
    assert events[-1][0] == "response.incomplete"


def test_open_responses_request_fields_are_accepted_and_echoed(live_server):
    body = create(
        live_server,
        input="Where is my parcel?",
        max_output_tokens=8,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        safety_identifier="user-hash-1",
        prompt_cache_key="support-v1",
        max_tool_calls=2,
        service_tier="auto",
    )
    check_resource(body)
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, 0.25)
    assert (body["safety_identifier"], body["prompt_cache_key"], body["max_tool_calls"]) == ("user-hash-1", "support-v1", 2)
    r = httpx.post(f"{live_server.base_url}/responses", json={"model": MODEL, "input": "hi", "background": True}, headers=live_server.headers(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "background"
