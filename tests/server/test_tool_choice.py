"""Tool choice beyond the model's own guess: the shortlist, grounded arguments, calls sized
to max_tokens, and the loop's handling of what small models do (units; the real engine
is in tests/e2e/test_tool_choice.py)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import regex
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.handles import Late
from server.toolcalls.budget import fit
from server.toolcalls.closing import close
from server.toolcalls.constraint import TEXT, build_constraint
from server.toolcalls.grounding import (
    MAX_CANDIDATES,
    candidates,
    conversation_text,
    ground,
    grounded_fields,
)
from server.toolcalls.shortlist import Ranked, Shortlister, ShortlistPolicy
from server.toolcalls.spec import ToolSpec
from tools import support

REFUND = support.create_refund.parameters
TICKET = support.lookup_ticket.parameters
HANDOFF = support.handoff_to_agent.parameters


# ---------------------------------------------------------------- grounding


def test_identifiers_are_narrowed_to_the_spans_that_match_their_pattern():
    said = "My dock from ORD-5002 broke; ticket T-1001 said to ask. Not ORD-50021 nor XORD-5003."
    grounded = ground(REFUND, said)["properties"]
    assert grounded["order_id"]["enum"] == ["ORD-5002"]
    assert ground(TICKET, said)["properties"]["ticket_id"]["enum"] == ["T-1001"]
    assert grounded_fields(TICKET, said) == (1, 0) and grounded_fields(TICKET, "where is my ticket?") == (0, 1)


def test_numbers_are_read_as_people_write_them_and_kept_in_bounds():
    node = {"type": "number", "exclusiveMinimum": 0, "maximum": 10000}
    said = "Refund 1,200 EUR or 12,50 or 89.99 on ORD-5002 from 2026-11-30 (v2), not -5 nor 20000."
    assert candidates(node, said) == [1200, 12.5, 89.99]
    assert candidates({"type": "integer"}, said) == [1200, -5, 20000]


def test_enum_members_said_in_words_are_kept_with_the_catch_all():
    reason = REFUND["properties"]["reason"]
    assert candidates(reason, "I cancelled the service last week") == ["cancelled_service", "other"]
    assert candidates(reason, "it was charged twice, a duplicate charge") == ["duplicate_charge", "other"]
    assert candidates(reason, "the other day it arrived") == []  # a catch-all alone is no evidence
    assert candidates(reason, "where is my parcel?") == []


def test_nothing_fits_or_too_much_fits_leaves_the_schema_alone():
    assert ground(REFUND, "refund please") is REFUND
    many = " ".join(f"T-{1000 + i}" for i in range(MAX_CANDIDATES + 1))
    assert "enum" not in ground(TICKET, many)["properties"]["ticket_id"]


def test_a_pattern_that_could_backtrack_for_ever_is_never_run_over_the_conversation():
    evil = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(a+)+$"}}}
    assert ground(evil, "a" * 5000 + "!") is evil  # refused before any search; the constraint names it in a 400
    assert candidates({"type": "string", "pattern": "(unclosed"}, "text") == []


def test_grounded_constraint_only_accepts_said_values():
    said = conversation_text([{"role": "system", "content": "ORD-9999"}, {"role": "user", "content": "Refund 15 EUR on ORD-5002, damaged"}])
    pattern = regex.compile(build_constraint([("create_refund", ground(REFUND, said))], allow_text=False, parallel=False).regex)
    assert pattern.fullmatch('[{"name": "create_refund", "arguments": {"order_id": "ORD-5002", "amount": 15, "reason": "damaged"}}]')
    assert not pattern.fullmatch('[{"name": "create_refund", "arguments": {"order_id": "ORD-9999", "amount": 15, "reason": "damaged"}}]')
    assert not pattern.fullmatch('[{"name": "create_refund", "arguments": {"order_id": "ORD-5002", "amount": 16, "reason": "damaged"}}]')


# ---------------------------------------------------------------- calls sized to max_tokens


def test_free_text_is_capped_so_that_the_call_closes_within_max_tokens():
    assert fit("handoff_to_agent", HANDOFF, 4000) is HANDOFF  # room enough: unchanged
    sized = fit("handoff_to_agent", HANDOFF, 64)
    cap = sized["properties"]["reason"]["maxLength"]
    assert 3 <= cap < 64
    longest = '[{"name": "handoff_to_agent", "arguments": {"reason": "' + "x" * cap + '"}}]'
    pattern = regex.compile(build_constraint([("handoff_to_agent", sized)], allow_text=False, parallel=False).regex)
    assert pattern.fullmatch(longest) and not pattern.fullmatch(longest.replace('x"', 'xx"'))
    # Counted with a tokenizer that spends more on the skeleton, less is left for the text.
    wide, narrow = (fit("handoff_to_agent", HANDOFF, 100, count_tokens=c)["properties"]["reason"]["maxLength"] for c in (None, len))
    assert 3 <= narrow < wide
    assert fit("handoff_to_agent", HANDOFF, 12) is HANDOFF  # no room for the shortest reason: left whole
    nested = {"type": "object", "properties": {"q": {"type": "string"}, "items": {"type": "array", "items": {"type": "string"}}}}
    assert fit("f", nested, 30) is nested  # no room for even one item: left whole
    open_object = {"type": "object", "properties": {"q": {"type": "string"}, "extra": {"type": "object"}}}
    assert fit("f", open_object, 4000) is open_object  # an open object has no size


ORDER = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}, "required": ["sku", "qty"]},
        },
    },
    "required": ["customer", "items"],
}


def _longest(name: str, schema: dict) -> str:
    """The longest call the sized schema allows: every array full, every string at its cap."""

    def value(node: dict):
        if node.get("type") == "array":
            return [value(node["items"])] * node["maxItems"]
        if node.get("type") == "object":
            return {k: value(v) for k, v in node["properties"].items()}
        if node.get("type") == "integer":
            return node["maximum"]
        return "x" * node["maxLength"]

    return json.dumps([{"name": name, "arguments": value(schema)}])


@pytest.mark.parametrize("max_tokens", [160, 240, 400])
def test_nested_arguments_are_sized_so_that_the_longest_call_closes_within_max_tokens(max_tokens):
    # The case: `{"items": [{"sku": …}]}` used to come back cut mid-string.
    sized = fit("place_order", ORDER, max_tokens, count_tokens=len)  # a token a character: the strictest count
    items = sized["properties"]["items"]
    assert 1 <= items["maxItems"] <= 8
    cap = items["items"]["properties"]["sku"]["maxLength"]
    assert cap == sized["properties"]["customer"]["maxLength"] >= 1
    longest = _longest("place_order", sized)
    assert len(longest) <= max_tokens
    pattern = regex.compile(build_constraint([("place_order", sized)], allow_text=False, parallel=False).regex)
    assert pattern.fullmatch(longest)
    one_more = json.loads(longest)
    one_more[0]["arguments"]["items"].append(one_more[0]["arguments"]["items"][0])
    assert not pattern.fullmatch(json.dumps(one_more))
    # A larger budget buys more items before longer strings.
    if max_tokens == 400:
        assert items["maxItems"] == 8 or cap >= 8
    assert fit("place_order", ORDER, 48, count_tokens=len) is ORDER  # not even one item fits: left whole


def test_text_under_auto_cannot_open_a_call_written_as_text():
    text = regex.compile(TEXT)
    assert text.fullmatch("Your plan is Pro.") and text.fullmatch("1. Open the app")
    for call in ('{"name": "lookup_ticket"}', "```json\n[]\n```", "<tool_call>{}</tool_call>", " [", "\n{"):
        assert not text.fullmatch(call), call


# ---------------------------------------------------------------- shortlist


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


def _support_tools() -> list[ToolSpec]:
    return [ToolSpec(t.name, t.description, t.parameters, server=True, asks=tuple(t.asks)) for t in (support.check_subscription_status, support.create_refund, support.handoff_to_agent, support.lookup_ticket)]


@pytest.mark.parametrize(
    "message,expected",
    [
        ("Is my membership still active?", "check_subscription_status"),
        ("What happened with T-1002?", "lookup_ticket"),
        ("ORD-5001 came broken, I want 30 EUR back", "create_refund"),
        ("Put me through to a real person", "handoff_to_agent"),
    ],
)
def test_the_tool_that_fits_the_request_leads(embedder, message, expected):
    shortlister = Shortlister(Late(embedder), ShortlistPolicy())
    messages = [{"role": "user", "content": message}]
    offered, ranked = asyncio.run(shortlister.shortlist(_support_tools(), messages, conversation_text(messages)))
    assert ranked[0].tool.name == expected and offered[0].name == expected and len(offered) <= 2


def test_the_leader_is_offered_alone_only_when_it_leads_clearly():
    tools = [ToolSpec(n, "", {}) for n in "abc"]
    shortlister = Shortlister(Late(None), ShortlistPolicy(size=2, margin=0.05))
    assert [t.name for t in shortlister.pick([Ranked(tools[0], 0.5, 0.5), Ranked(tools[1], 0.4, 0.4), Ranked(tools[2], 0.1, 0.1)])] == ["a"]
    assert [t.name for t in shortlister.pick([Ranked(tools[0], 0.5, 0.5), Ranked(tools[1], 0.47, 0.47), Ranked(tools[2], 0.46, 0.46)])] == ["a", "b"]
    assert not shortlister.applies(tools, "required")  # no embedding model: every tool is offered


# ---------------------------------------------------------------- the loop (ScriptedEngine)


@pytest.fixture
def scripted(tmp_path, embedder):
    engine = ScriptedEngine(served_model="scripted", max_model_len=4096)
    with TestClient(create_app(load_settings(data_dir=tmp_path, deployment="support"), engine=engine, embedder=embedder)) as api:
        yield engine, api


def _ask(api, content: str, **extra) -> dict:
    body = {"model": "scripted", "messages": [{"role": "user", "content": content}], "tools": [{"type": "server", "name": "support"}]} | extra
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_turn_offers_the_shortlist_and_reports_it(scripted):
    engine, api = scripted
    engine.queue('[{"name": "lookup_ticket", "arguments": {"ticket_id": "T-1001"}}]', "It is open.")
    body = _ask(api, "Any news on my ticket T-1001?", tool_choice="required")
    assert body["tool_shortlist"]["offered"] == ["lookup_ticket"]
    ranked = body["tool_shortlist"]["ranked"]
    assert ranked[0]["name"] == "lookup_ticket" and len(ranked) == 5
    first = next(c for c in engine.calls if "precompile" not in c.request_id).params.regex
    assert "create_refund" not in first and '"T\\-1001"' in first  # offered alone, its id grounded


def test_under_auto_a_clear_tool_request_calls_and_anything_else_is_left_to_the_model(scripted):
    engine, api = scripted
    engine.queue('[{"name": "lookup_ticket", "arguments": {"ticket_id": "T-1001"}}]', "It is open.", "Hello! How can I help?")
    called = _ask(api, "Any news on my ticket T-1001?", tool_choice="auto")
    assert called["tool_shortlist"]["decision"] == "call"
    steps = [c for c in engine.calls if "precompile" not in c.request_id]
    # The first step must call (no text branch); the step after the result may answer.
    assert not regex.fullmatch(steps[0].params.regex, "It is open.") and regex.fullmatch(steps[1].params.regex, "It is open.")
    assert called["choices"][0]["message"]["content"] == "It is open."
    chat = _ask(api, "Hello there, are you a bot?", tool_choice="auto")
    assert chat["tool_shortlist"]["decision"] == "model" and chat["choices"][0]["message"]["content"] == "Hello! How can I help?"
    assert regex.fullmatch([c for c in engine.calls if "precompile" not in c.request_id][-1].params.regex, "Hello! How can I help?")


def test_the_call_decision_needs_the_leader_to_reach_its_threshold():
    tool, card = ToolSpec("a", "", {}, asks=("do a",)), ToolSpec("b", "", {})
    shortlister = Shortlister(Late(object()), ShortlistPolicy(call_at=0.5, call_at_cards=0.3))
    assert shortlister.applies([tool], "auto") and not shortlister.applies([tool], "required")
    assert shortlister.must_call([Ranked(tool, 0.5, 0.5)]) and not shortlister.must_call([Ranked(tool, 0.49, 0.49)])
    # A tool known by its card only (a client's) scores lower for the same fit.
    assert shortlister.must_call([Ranked(card, 0.3, 0.3)]) and not shortlister.must_call([Ranked(card, 0.29, 0.29)])
    off = Shortlister(Late(object()), ShortlistPolicy(call_at=None))
    assert not off.applies([tool], "auto") and not off.must_call([Ranked(tool, 0.9, 0.9)])


def test_a_one_off_tool_runs_once_a_turn_however_often_it_is_called(scripted):
    engine, api = scripted
    engine.queue(
        '[{"name": "handoff_to_agent", "arguments": {"reason": "wants a human"}}, {"name": "handoff_to_agent", "arguments": {"reason": "a human please"}}]',
        '[{"name": "handoff_to_agent", "arguments": {"reason": "still wants a human"}}]',
        "A colleague will take over.",
    )
    body = _ask(api, "Let me talk to a person", tool_choice="required")
    assert [c["name"] for c in body["server_tool_calls"]] == ["handoff_to_agent"]
    assert body["choices"][0]["message"]["content"] == "A colleague will take over."
    assert engine.calls[-1].params.regex == TEXT  # the model answers once nothing new is left to run


def test_calls_completed_before_max_tokens_cut_still_count(scripted):
    engine, api = scripted
    engine.queue('[{"name": "check_subscription_status", "arguments": {}}, {"name": "lookup_ticket", "arguments": {"ticket_id": "T-10', "You are on Pro.")
    body = _ask(api, "plan?", tool_choice="required", max_tokens=8)
    assert [c["name"] for c in body["server_tool_calls"]] == ["check_subscription_status"]
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}} for n in ("f", "g")]
    engine.queue('[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"x": 2')
    r = api.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "go"}], "tools": tools, "tool_choice": "required", "max_tokens": 9})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and [json.loads(c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [{"x": 1}]


# ---------------------------------------------------------------- calls cut by max_tokens, closed

CUT = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "meta": {"type": "object"},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "size": {"enum": ["small", "large"]}, "gift": {"type": "boolean"}},
                "required": ["sku", "qty"],
            },
        },
    },
    "required": ["customer", "items", "meta"],
}


def test_a_call_cut_anywhere_is_closed_into_arguments_its_schema_accepts():
    full = json.dumps({"customer": 'Ann "B" \\ Co', "items": [{"sku": "A-1", "qty": 12, "size": "large", "gift": True}, {"sku": "B-2", "qty": 3}], "meta": {"k": [1, None]}})
    for cut in range(1, len(full)):
        tail = close(full[:cut], CUT)
        assert tail is not None, full[:cut]
        jsonschema.validate(json.loads(full[:cut] + tail), CUT)
    assert close('{"customer": "Ann", "items": [{"sku": "A-1", "qty": 2, "size": "la', CUT) == 'rge"}], "meta": {}}'
    assert close('{"customer": "Ann", "items": [', CUT) == '{"sku": "", "qty": 1}], "meta": {}}'


def test_a_cut_no_tail_can_make_valid_is_not_closed():
    patterned = {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}}, "required": ["order_id"]}
    assert close('{"order_id": "ORD-1', patterned) is None
    assert close("not json", CUT) is None
