"""The model declining a request the rails passed: the policy's judgement of an opening
(server/declines.py) and the decline stage of the turn (server/turn/decline_retry.py) on
ScriptedEngine. The real model's declines are retried end to end in tests/e2e."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.declines import DeclinePolicy, Judgement
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from tests.server.rails_dirs import RAILS

POLICY = DeclinePolicy.from_config(yaml.safe_load((RAILS / "config.yml").read_text())["custom_data"]["enclave"]["model_declines"])
# SmolLM2-135M's own words for requests a support desk answers every day.
DECLINE = "I'm sorry for any misunderstanding, but as a chatbot, I don't have the ability to change your invoice address."
ANSWER = "You can change the invoice address under Billing in your account settings."
ASK = [{"role": "user", "content": "Can you help me change my invoice address?"}]


@pytest.mark.parametrize(
    "text",
    [
        DECLINE,
        "I'm sorry for your loss, but as a chatbot designed to assist with digital services, I'm unable to",
        "I\u2019m sorry, but I can\u2019t access your account.",  # typographic apostrophes
        "Unfortunately, I do not have access to order data.",
        "I'm sorry for any confusion. Unfortunately I'm not able to update your profile.",
    ],
)
def test_declines_in_the_models_own_words_are_recognised_in_the_opening(text):
    assert POLICY.judge(text, final=False) is Judgement.DECLINE


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry to hear that. Let me look at your order.",  # an apology that goes on to help
        "To return an item, open the order and choose Return.",
        "Sure, here are the steps.",
        "I'm sorry for the delay. Your parcel left the warehouse today. It arrives Friday.",
    ],
)
def test_answers_are_released_without_waiting_for_the_whole_opening(text):
    assert POLICY.judge(text, final=False) is Judgement.ANSWER


def test_an_opening_that_may_still_become_a_decline_is_held_and_a_decline_later_on_is_not_judged():
    assert POLICY.judge("I'm s", final=False) is Judgement.UNDECIDED  # "I'm sorry" or "I'm sure"?
    assert POLICY.judge("I'm su", final=False) is Judgement.ANSWER
    assert POLICY.judge("I'm sorry for any confusion.", final=False) is Judgement.UNDECIDED  # a hedging first sentence
    assert POLICY.judge("I'm sorry for any confusion.", final=True) is Judgement.ANSWER
    later = "Here is how returns work. " * 12 + "I cannot help with exchanges."
    assert POLICY.judge(later, final=True) is Judgement.ANSWER  # past the opening


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
