"""The model declining a request the rails passed: the policy's judgement of an opening
(server/declines.py) and the decline stage of the turn (server/turn/decline_retry.py) on
ScriptedEngine. The real model's declines are retried end to end in tests/e2e."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest
import yaml
from fastapi.testclient import TestClient

from server.app import create_app
from server.auth import ANONYMOUS
from server.config import load_settings
from server.declines import DeclinePolicy, Judgement, Scan
from server.embedder import Embedder, packaged_model_dir
from server.engine.base import GenerationParams
from server.engine.scripted import ScriptedEngine
from server.protocol import ChatCompletionRequest
from server.telemetry.metrics import Metrics
from server.turn.decline_retry import DeclineRetry
from server.turn.events import Kind, TurnEvent
from server.turn.guard_ledger import GuardLedger
from server.turn.state import Progress, Turn, TurnRequest
from tests.server.rails_dirs import RAILS

POLICY = DeclinePolicy.from_config(yaml.safe_load((RAILS / "config.yml").read_text())["custom_data"]["enclave"]["model_declines"])
# SmolLM2-135M's own words for requests a support desk answers every day.
DECLINE = "I'm sorry for any misunderstanding, but as a chatbot, I don't have the ability to change your invoice address."
ANSWER = "You can change the invoice address under Billing in your account settings."
ASK = [{"role": "user", "content": "Can you help me change my invoice address?"}]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (DECLINE, ""),  # the apology opening its sentence is part of the decline
        ("I'm sorry for your loss, but as a chatbot designed to assist with digital services, I'm unable to", ""),
        ("I\u2019m sorry, but I can\u2019t access your account.", ""),  # typographic apostrophes
        ("Unfortunately, I do not have access to order data.", ""),
        ("I'm sorry for any confusion. Unfortunately I'm not able to update your profile.", "I'm sorry for any confusion. "),
        ("Thanks for asking! However, as a chatbot, I cannot change it.", "Thanks for asking! "),
    ],
)
def test_declines_in_the_models_own_words_are_recognised_in_the_opening(text, kept):
    scan = POLICY.scan(text, final=False)
    assert scan.judgement is Judgement.DECLINE and text[: scan.releasable] == kept


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry to hear that. Let me look at your order.",  # an apology that goes on to help
        "To return an item, open the order and choose Return.",
        "Sure, here are the steps.",
        "I'm sorry for the delay. Your parcel left the warehouse today. It arrives Friday.",
        "Thank you for reaching out! I can help with that.",
    ],
)
def test_answers_are_released_as_they_come(text):
    assert POLICY.scan(text, final=False) == Scan(Judgement.UNDECIDED, len(text))
    assert POLICY.scan(text, final=True) == Scan(Judgement.ANSWER, len(text))


def test_only_text_where_a_decline_may_be_starting_is_held_and_a_decline_later_on_is_not_judged():
    assert POLICY.scan("I'm s", final=False).releasable == 0  # "I'm sorry" or "I'm sure"?
    assert POLICY.scan("I'm su", final=False).releasable == 6
    assert POLICY.scan("I'm sorry for any confusion", final=False).releasable == 0  # its sentence may yet decline
    assert POLICY.scan("I'm sorry for any confusion.", final=False).releasable == 28  # it did not
    assert POLICY.scan("Thank you for reaching out! I", final=False).releasable == 28  # "I can't…"?
    assert POLICY.scan("Sure. But as a", final=False).releasable == 6
    later = "Here is how returns work. " * 12 + "I cannot help with exchanges."
    assert POLICY.scan(later, final=False).judgement is Judgement.ANSWER  # past the opening


def test_a_policy_that_is_off_or_absent_is_none():
    assert DeclinePolicy.from_config(None) is None and DeclinePolicy.from_config({"enabled": False, "patterns": ["x"]}) is None


def _answers(engine):
    return [c for c in engine.calls if not c.request_id.startswith("guard-")]


def test_a_benign_request_the_model_declines_is_answered_by_a_second_generation_without_declining_words(api, engine):
    engine.queue(DECLINE, ANSWER)
    body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == ANSWER and choice["finish_reason"] == "stop"
    first, second = _answers(engine)
    assert second.request_id == first.request_id + "-d" and second.prompt_token_ids == first.prompt_token_ids
    assert first.params.bad_words == () and second.params.bad_words == POLICY.avoid and "chatbot" in second.params.bad_words
    [event] = [e for e in body["guardrails"] if e["rail"] == "model declines"]
    assert event["stage"] == "output" and event["action"] == "retried" and "as a chatbot" in event["reason"]
    # The declining generation was stopped as soon as it declined; what both generated is
    # in the usage (and the cost), since both ran.
    assert first.request_id in engine.aborted
    assert engine.count_tokens(ANSWER) < body["usage"]["completion_tokens"] < engine.count_tokens(DECLINE) + engine.count_tokens(ANSWER)
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="retried"} 1.0' in api.get("/metrics").text


def test_a_streamed_decline_never_reaches_the_client(api, engine):
    engine.queue(DECLINE, ANSWER)
    with api.stream("POST", "/v1/chat/completions", json={"model": "scripted", "messages": ASK, "stream": True}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ANSWER and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_answer_that_does_not_decline_is_generated_once(api, engine):
    engine.queue("I'm sorry to hear that. " + ANSWER)
    body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
    assert body["choices"][0]["message"]["content"].endswith(ANSWER) and len(_answers(engine)) == 1
    assert not [e for e in body["guardrails"] if e["rail"] == "model declines"]


def test_a_second_decline_stands_and_constrained_or_sampled_answers_are_not_judged(api, engine):
    engine.queue(DECLINE, DECLINE)
    body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
    assert body["choices"][0]["message"]["content"] == DECLINE and len(_answers(engine)) == 2  # one retry, no loop
    engine.calls.clear()
    engine.queue(DECLINE, DECLINE)
    body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK, "n": 2}).json()
    assert [c["message"]["content"] for c in body["choices"]] == [DECLINE, DECLINE] and len(_answers(engine)) == 1
    engine.calls.clear()
    engine.queue(DECLINE)
    body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK, "response_format": {"type": "json_object"}}).json()
    assert len(_answers(engine)) == 1 and _answers(engine)[0].params.json_schema is not None


def test_a_decline_of_a_request_in_the_rails_uncertain_band_stands(tmp_path):
    # retry_below 0: every request with a harmful-intent score is "uncertain" for this test
    # (the score needs the embedding model, which the other tests here go without).
    rails = tmp_path / "rails"
    shutil.copytree(RAILS, rails, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = rails / "config.yml"
    cfg.write_text(cfg.read_text().replace("      retry_below: 0.3\n", "      retry_below: 0.0\n"))
    engine = ScriptedEngine([DECLINE, ANSWER], served_model="scripted", max_model_len=256)
    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    with TestClient(create_app(load_settings(data_dir=tmp_path, rails_dir=rails), engine=engine, embedder=embedder)) as api:
        body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
        metrics = api.get("/metrics").text
    assert body["choices"][0]["message"]["content"] == DECLINE and len(_answers(engine)) == 1
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="kept"} 1.0' in metrics


def test_a_decline_after_text_already_shown_is_continued_from_there(api, engine):
    shown = "Thanks for asking!"
    engine.queue(shown + " However, as a chatbot, I cannot change it.", " You can change it under Billing.")
    with api.stream("POST", "/v1/chat/completions", json={"model": "scripted", "messages": ASK, "stream": True, "max_tokens": 20}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == shown + " You can change it under Billing." and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    first, second = _answers(engine)
    # The continuation is generated after the shown text, as the engine produced it,
    # within what is left of the answer's tokens.
    assert second.prompt_token_ids[: len(first.prompt_token_ids)] == first.prompt_token_ids
    assert len(second.prompt_token_ids) - len(first.prompt_token_ids) == engine.count_tokens(shown) == 3
    assert second.params.max_tokens == 17 and second.params.bad_words == POLICY.avoid


def test_text_is_released_as_soon_as_no_decline_can_start_in_it():
    log: list[str] = []

    async def first():
        for word in ["Thank", " you!", " I", " can", " help.", " Sorry", " for", " the", " wait."]:
            log.append(f"in {word}")
            yield TurnEvent(Kind.TEXT, 0, word)
        log.append("in finish")
        yield TurnEvent.finish(0, "stop")

    async def run():
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": ASK})
        turn = Turn(TurnRequest("chatcmpl-1", body, ANONYMOUS, None, time.perf_counter()), GuardLedger())
        turn.step.params = GenerationParams(max_tokens=16)
        # Neither the guard nor a second generation is needed when nothing declines.
        stage = DeclineRetry(None, POLICY, None, Metrics())  # type: ignore[arg-type]
        async for ev in stage.events(turn, Progress(), first()):
            log.append(f"out {ev.text}")

    asyncio.run(run())
    assert log == [
        "in Thank", "out Thank", "in  you!", "out  you!",
        "in  I", "in  can", "in  help.", "out  I", "out  can", "out  help.",  # "I can…" may be "I cannot help"
        "in  Sorry", "in  for", "in  the", "in  wait.", "out  Sorry", "out  for", "out  the", "out  wait.",  # an apology, to its sentence's end
        "in finish", "out stop",
    ]  # fmt: skip
