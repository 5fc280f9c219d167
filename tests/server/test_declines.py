"""The model declining a request the rails passed: the policy's judgement of an opening
(server/declines.py) and the decline stage of the turn (server/turn/decline_retry.py) on
ScriptedEngine. The real model's declines are retried end to end in tests/e2e."""

from __future__ import annotations

import asyncio
import json
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
from server.guard import Guard
from server.protocol import ChatCompletionRequest
from server.spellings import spellings
from server.telemetry.metrics import Metrics
from server.turn.decline_retry import DeclineRetry
from server.turn.events import Kind, TurnEvent
from server.turn.guard_ledger import GuardLedger
from server.turn.state import Progress, Turn, TurnRequest
from tests.server.rails_dirs import RAILS, rails_copy

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


def _rails(tmp_path, prevent: bool, retry_below: float = 0.3):
    """A copy of rails/ with the stage's `prevent` and `retry_below` set."""
    return rails_copy(tmp_path, {"      prevent: true\n      retry_below: 0.3\n": f"      prevent: {str(prevent).lower()}\n      retry_below: {retry_below}\n"})


@pytest.fixture
def retrying(engine, tmp_path):
    """The app with prevention off: every decline reaches the retry."""
    with TestClient(create_app(load_settings(data_dir=tmp_path, rails_dir=_rails(tmp_path, prevent=False)), engine=engine)) as client:
        yield client


def test_the_shipped_policy_prevents_declines_and_every_decline_it_prevents_begins_with_a_ruled_out_phrase():
    assert POLICY.prevent
    config = yaml.safe_load((RAILS / "config.yml").read_text())["custom_data"]["enclave"]["model_declines"]
    # As the model writes it: the sentence's capital I (the patterns are lower case).
    closed = [spellings(p) for p in config["patterns"]]
    assert [s is None for s in closed] == [False, False, False, True]  # "as a … bot" is open
    written = {"I" + w[1:] for found in closed if found for w in found}
    assert len(written) > 100 and "I'm not designed to" in written
    assert [w for w in written if not w.startswith(POLICY.avoid)] == []
    # So in a prevented generation they are not held for, nor are the apologies it cannot
    # write; the open one, and an apology that can still introduce it, are.
    for text in ["I", "I'm", "I'm not", "I'm not sure which order you mean."]:
        assert POLICY.scan(text, final=False, prevented=True).releasable == len(text), text
    for text in ["I", "I'm", "I'm not"]:
        assert POLICY.scan(text, final=False).releasable == 0, text
    assert POLICY.scan("Happy to help, but as a", final=False, prevented=True) == Scan(Judgement.UNDECIDED, len("Happy to help, "))
    assert POLICY.scan("Sorry for the wait", final=False, prevented=True) == Scan(Judgement.UNDECIDED, 0)


def test_only_a_pattern_whose_every_spelling_begins_with_a_ruled_out_phrase_counts_as_prevented():
    def unavoided(patterns, avoid):
        policy = DeclinePolicy.from_config({"patterns": patterns, "avoid": avoid})
        return policy.unavoided.pattern if policy.unavoided is not None else None

    assert unavoided([r"\bi('m| am) unable to\b"], ["I'm unable", "I am unable"]) is None
    assert "unable" in unavoided([r"\bi('m| am) unable to\b"], ["I'm unable"])  # "I am unable to" is not ruled out
    assert "unfortunately" in unavoided(["unfortunately, i can't"], ["Unfortunately"])  # mid-sentence it is lower case
    assert "bot" in unavoided([r"as an? \w+ bot"], ["as a"])  # open: its words cannot be listed, so it is held for


def test_a_benign_request_is_generated_with_declining_ruled_out_from_its_first_token(api, engine):
    # No embedding model here: no harmful-intent score, which the stage reads as benign
    # (as the retry does).
    engine.queue(ANSWER)
    with api.stream("POST", "/v1/chat/completions", json={"model": "scripted", "messages": ASK, "stream": True}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == ANSWER
    [call] = _answers(engine)
    assert call.params.bad_words == POLICY.avoid and call.request_id not in engine.aborted
    metrics = api.get("/metrics").text
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="prevented"} 1.0' in metrics
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="retried"} 0.0' in metrics


def test_a_decline_in_words_the_rule_does_not_cover_is_still_retried_without_its_opening_word(api, engine):
    other = "Sure! We're sorry, but as a support AI we cannot change it."  # in no avoid phrase
    engine.queue(other, " You can change it under Billing.")
    body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
    assert body["choices"][0]["message"]["content"] == "Sure! We're You can change it under Billing."
    first, second = _answers(engine)
    assert first.params.bad_words == POLICY.avoid and second.request_id == first.request_id + "-d"
    # The retry may not open with the decline's first word again ("sorry"), which no
    # avoid phrase covers; a decline that begins with an avoid phrase adds nothing.
    assert second.params.bad_words == (*POLICY.avoid, "sorry")
    assert POLICY.avoid_after("I'm sorry, but I can't") == POLICY.avoid
    assert POLICY.avoid_after("However, as a support bot") == (*POLICY.avoid, "However")
    assert POLICY.avoid_after("I really can not do that") == (*POLICY.avoid, "I really")


def test_without_a_harmful_intent_score_nothing_is_ruled_out_or_retried(api, engine, monkeypatch):
    async def broken(self, text):
        raise RuntimeError("the embedding model is gone")

    monkeypatch.setattr(Guard, "p_harmful", broken)
    engine.queue(ANSWER, DECLINE)
    r = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == DECLINE
    prevented, plain = _answers(engine)
    assert prevented.request_id in engine.aborted and plain.params.bad_words == ()
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="kept"} 1.0' in api.get("/metrics").text


def test_a_request_in_the_uncertain_band_is_generated_again_without_the_rule_before_anything_is_shown(tmp_path):
    # retry_below 0: every request with a harmful-intent score is "uncertain" for this test.
    engine = ScriptedEngine([ANSWER, DECLINE], served_model="scripted", max_model_len=256)
    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    settings = load_settings(data_dir=tmp_path, rails_dir=_rails(tmp_path, prevent=True, retry_below=0.0))
    with TestClient(create_app(settings, engine=engine, embedder=embedder)) as api:
        body = {"model": "scripted", "messages": ASK, "stream": True, "stream_options": {"include_usage": True}}
        with api.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        metrics = api.get("/metrics").text
    # The model's own decline stands there; the generation without it was never shown.
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == DECLINE
    first, second = _answers(engine)
    assert first.params.bad_words == POLICY.avoid and first.request_id in engine.aborted
    assert second.params.bad_words == () and second.request_id == first.request_id + "-u"
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="kept"} 1.0' in metrics
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="prevented"} 0.0' in metrics
    # The dropped generation is not a client that left.
    assert 'enclave_requests_aborted_total{model="scripted",reason="superseded"} 1.0' in metrics
    assert 'reason="client_disconnected"' not in metrics
    # Both prefills ran: both prompts are in the usage.
    assert chunks[-1]["usage"]["prompt_tokens"] == 2 * len(first.prompt_token_ids)


def test_a_benign_request_the_model_declines_is_answered_by_a_second_generation_without_declining_words(retrying, engine):
    engine.queue(DECLINE, ANSWER)
    body = retrying.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
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
    metrics = retrying.get("/metrics").text
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="retried"} 1.0' in metrics
    assert 'enclave_requests_aborted_total{model="scripted",reason="superseded"} 1.0' in metrics and 'reason="client_disconnected"' not in metrics


def test_a_streamed_decline_never_reaches_the_client(retrying, engine):
    engine.queue(DECLINE, ANSWER)
    with retrying.stream("POST", "/v1/chat/completions", json={"model": "scripted", "messages": ASK, "stream": True}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ANSWER and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_answer_that_does_not_decline_is_generated_once(retrying, engine):
    engine.queue("I'm sorry to hear that. " + ANSWER)
    body = retrying.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
    assert body["choices"][0]["message"]["content"].endswith(ANSWER) and len(_answers(engine)) == 1
    assert not [e for e in body["guardrails"] if e["rail"] == "model declines"]


def test_a_second_decline_stands_and_constrained_or_sampled_answers_are_not_judged(retrying, engine):
    engine.queue(DECLINE, DECLINE)
    body = retrying.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
    assert body["choices"][0]["message"]["content"] == DECLINE and len(_answers(engine)) == 2  # one retry, no loop
    engine.calls.clear()
    engine.queue(DECLINE, DECLINE)
    body = retrying.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK, "n": 2}).json()
    assert [c["message"]["content"] for c in body["choices"]] == [DECLINE, DECLINE] and len(_answers(engine)) == 1
    engine.calls.clear()
    engine.queue(DECLINE)
    body = retrying.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK, "response_format": {"type": "json_object"}}).json()
    assert len(_answers(engine)) == 1 and _answers(engine)[0].params.json_schema is not None


def test_a_decline_of_a_request_in_the_rails_uncertain_band_stands(tmp_path):
    # retry_below 0: every request with a harmful-intent score is "uncertain" for this test
    # (the score needs the embedding model, which the other tests here go without).
    rails = _rails(tmp_path, prevent=False, retry_below=0.0)
    engine = ScriptedEngine([DECLINE, ANSWER], served_model="scripted", max_model_len=256)
    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    with TestClient(create_app(load_settings(data_dir=tmp_path, rails_dir=rails), engine=engine, embedder=embedder)) as api:
        body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": ASK}).json()
        metrics = api.get("/metrics").text
    assert body["choices"][0]["message"]["content"] == DECLINE and len(_answers(engine)) == 1
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="kept"} 1.0' in metrics


def test_a_decline_after_text_already_shown_is_continued_from_there(retrying, engine):
    shown = "Thanks for asking!"
    engine.queue(shown + " However, as a chatbot, I cannot change it.", " You can change it under Billing.")
    with retrying.stream("POST", "/v1/chat/completions", json={"model": "scripted", "messages": ASK, "stream": True, "max_tokens": 20}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == shown + " You can change it under Billing." and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    first, second = _answers(engine)
    # The continuation is generated after the shown text, as the engine produced it,
    # within what is left of the answer's tokens.
    assert second.prompt_token_ids[: len(first.prompt_token_ids)] == first.prompt_token_ids
    assert len(second.prompt_token_ids) - len(first.prompt_token_ids) == engine.count_tokens(shown) == 3
    assert second.params.max_tokens == 17 and second.params.bad_words == (*POLICY.avoid, "However")


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


def test_in_the_uncertain_band_nothing_is_held_and_a_decline_is_counted_kept():
    log: list[str] = []

    async def first():
        for word in ["I'm", " sorry,", " but", " as", " a", " chatbot,", " I", " can't."]:
            log.append(f"in {word}")
            yield TurnEvent(Kind.TEXT, 0, word)
        log.append("in finish")
        yield TurnEvent.finish(0, "stop")

    metrics = Metrics()
    stage = DeclineRetry(None, POLICY, None, metrics)  # type: ignore[arg-type]

    async def uncertain(turn, progress):
        p = asyncio.get_running_loop().create_future()
        p.set_result(POLICY.retry_below + 0.1)  # the score, known before the first event
        return first(), p

    stage._start = uncertain  # type: ignore[method-assign]

    async def run():
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": ASK})
        turn = Turn(TurnRequest("chatcmpl-1", body, ANONYMOUS, None, time.perf_counter()), GuardLedger())
        turn.step.params = GenerationParams(max_tokens=16)
        async for ev in stage.events(turn, Progress()):
            log.append(f"out {ev.text}")

    asyncio.run(run())
    # Each word goes out as it comes: the decline would stand, so there is nothing to wait for.
    words = [w for w in log if w.startswith("in ") and w != "in finish"]
    assert log[: 2 * len(words)] == [x for w in words for x in (w, "out " + w[3:])]
    assert 'enclave_rail_verdicts_total{rail="model declines",stage="output",verdict="kept"} 1.0' in metrics.render().decode()
