"""Answers built from evidence: which sentences count, how one is chosen, and when the
model answers in its own words instead (units with the real embedding model and a
scripted engine; the real engine is in tests/e2e/test_source_answers.py)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from server.auth import ANONYMOUS
from server.config import SourceAnswerPolicy, load_settings
from server.embedder import Embedder, packaged_model_dir
from server.engine.base import GenerationParams
from server.engine.scripted import ScriptedEngine
from server.errors import ConfigError
from server.handles import Late
from server.memory.context import ContextRequest
from server.memory.episodic import Memory
from server.memory.evidence import (
    evidence,
    is_question,
    knowledge_sentences,
    told_sentences,
)
from server.memory.knowledge import Hit
from server.protocol import ChatCompletionRequest
from server.telemetry.metrics import Metrics
from server.turn.events import Kind, TurnEvent
from server.turn.generation import Generation
from server.turn.guard_ledger import GuardLedger
from server.turn.source_answer import SourceAnswer, source_answers_on
from server.turn.state import Progress, Turn, TurnRequest

SHIPPING = Hit(
    "file-1",
    "shipping.md",
    0,
    0.7,
    "Shipping and delivery > Delivery costs\nStandard delivery is free for orders over 50 EUR; below that it costs 4.90 EUR. "
    "Express delivery costs 12.50 EUR for any order.",
    "vs_1",
)
WARRANTY = Hit("file-2", "warranty.md", 0, 0.5, "Warranty > Coverage\nAll hardware carries a 2-year warranty from the date of delivery.", "vs_1")


def _turn(question: str, sources=(), recalled=(), history=(), **request) -> Turn:
    messages = [*history, {"role": "user", "content": question}]
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **request})
    turn = Turn(TurnRequest("chatcmpl-1", body, ANONYMOUS, None, time.perf_counter()), GuardLedger())
    turn.context = ContextRequest("", messages, sources=list(sources), recalled=list(recalled))
    turn.step.messages = [{"role": "system", "content": "sources…"}, *messages]
    turn.step.params = GenerationParams(max_tokens=48, temperature=0.0)
    return turn


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


def _stage(embedder, engine: ScriptedEngine | None = None, **policy) -> SourceAnswer:
    engine = engine or ScriptedEngine()
    return SourceAnswer(Late(embedder), engine, Generation(engine, Metrics()), SourceAnswerPolicy(**policy))


async def _answer(stage: SourceAnswer, turn: Turn, free: str = "free words") -> list[TurnEvent]:
    async def otherwise():
        yield TurnEvent(Kind.TEXT, 0, free)
        yield TurnEvent.finish(0, "stop")

    return [ev async for ev in stage.events(turn, Progress(), otherwise)]


# ---------------------------------------------------------------- evidence


def test_knowledge_sentences_are_numbered_as_the_sources_block_numbers_them():
    found = knowledge_sentences([SHIPPING, WARRANTY])
    assert [(s.text, s.source) for s in found] == [
        ("Standard delivery is free for orders over 50 EUR; below that it costs 4.90 EUR.", 1),
        ("Express delivery costs 12.50 EUR for any order.", 1),
        ("All hardware carries a 2-year warranty from the date of delivery.", 2),
    ]
    assert found[0].ranked_text() == "Delivery costs: Standard delivery is free for orders over 50 EUR; below that it costs 4.90 EUR."


def test_the_users_words_are_evidence_only_for_a_question():
    recalled = [Memory("mem-1", "My order number is ORD-7781.", "fact", 0.8)]
    history = [{"role": "user", "content": "My dock has serial SN-4471. Where is it?"}, {"role": "assistant", "content": "SN-9999 is shipped."}]
    turn = _turn("What is my serial number?", recalled=recalled, history=history)
    told = told_sentences(turn.context.recalled, turn.step.messages)
    # The assistant's words and the user's questions are not what the user told us.
    assert [s.text for s in told] == ["My order number is ORD-7781.", "My dock has serial SN-4471."]
    assert all(s.told for s in told)
    assert is_question("what is my serial number") and is_question("Remind me of my order") and not is_question("Write a poem about my dock")
    assert evidence(turn.context, turn.step.messages, "Write a poem about my dock") == []


# ---------------------------------------------------------------- the stage


def test_the_answer_is_the_best_sentence_cited(embedder):
    stage = _stage(embedder)
    turn = _turn("How much does express delivery cost?", sources=[SHIPPING, WARRANTY])
    assert stage.applies(turn)
    events = asyncio.run(_answer(stage, turn))
    assert [(e.kind, e.text) for e in events] == [(Kind.TEXT, "Express delivery costs 12.50 EUR for any order. [1]"), (Kind.FINISH, "stop")]
    report = turn.report.source_answer
    assert report["answered"] and report["chosen"] == 0 and report["candidates"][0]["source"] == 1


def test_the_users_own_words_are_quoted_back(embedder):
    history = [{"role": "user", "content": "My order number is ORD-7781 and it is a standing desk."}, {"role": "assistant", "content": "Noted."}]
    events = asyncio.run(_answer(_stage(embedder), _turn("What was my order number?", history=history)))
    assert events[0].text == "You told me earlier: \u201cMy order number is ORD-7781 and it is a standing desk.\u201d"


def test_no_sentence_close_enough_leaves_the_answer_to_the_model(embedder):
    turn = _turn("What is the capital of France?", sources=[SHIPPING, WARRANTY])
    events = asyncio.run(_answer(_stage(embedder, min_similarity=0.40), turn))
    assert events[0].text == "free words"
    assert turn.report.source_answer["answered"] is False


def test_the_models_one_token_choice_moves_the_ranking(embedder):
    engine = ScriptedEngine(["2"])
    stage = _stage(embedder, engine, candidates=2, model_weight=1.0)
    turn = _turn("How much does express delivery cost?", sources=[SHIPPING, WARRANTY])
    progress = Progress()

    async def run():
        async def otherwise():
            yield TurnEvent.finish(0, "stop")

        return [ev async for ev in stage.events(turn, progress, otherwise)]

    events = asyncio.run(run())
    call = engine.calls[0]
    # One token, constrained to the candidates' numbers, its alternatives read.
    assert call.params.max_tokens == 1 and call.params.regex == "[1-2]" and call.params.logprobs
    assert call.request_id == "chatcmpl-1-choice"
    report = turn.report.source_answer
    assert report["chosen"] == 1 and report["candidates"][1]["p_model"] == 1.0
    assert events[0].text == report["candidates"][1]["text"] + f" [{report['candidates'][1]['source']}]"
    # The choice's tokens are the turn's (usage and cost); the answer's step is restored.
    assert progress.prompt_tokens > 0 and progress.completion_tokens == 1
    assert turn.step.params.max_tokens == 48


@pytest.mark.parametrize(
    "request_extra,params",
    [
        ({"n": 2}, {"n": 2}),
        ({"logprobs": True}, {"logprobs": 0}),
        ({}, {"json_schema": {"type": "object"}}),
    ],
)
def test_only_a_plain_answer_of_one_choice_is_built_from_evidence(embedder, request_extra, params):
    turn = _turn("How much does express delivery cost?", sources=[SHIPPING], **request_extra)
    turn.step.params = GenerationParams(max_tokens=48, **params)
    assert not _stage(embedder).applies(turn)
    turn = _turn("How much does express delivery cost?", sources=[SHIPPING])
    turn.step.tool_choice = "auto"
    assert not _stage(embedder).applies(turn)
    turn.context = None
    assert not _stage(embedder).applies(turn)


def test_a_failed_embedding_answers_as_without_the_stage(embedder):
    class Broken:
        async def embed(self, texts):
            raise RuntimeError("encoder gone")

    stage = SourceAnswer(Late(Broken()), ScriptedEngine(), Generation(ScriptedEngine(), Metrics()), SourceAnswerPolicy())
    events = asyncio.run(_answer(stage, _turn("How much does express delivery cost?", sources=[SHIPPING])))
    assert events[0].text == "free words"


def test_each_deployment_chooses_source_answers_or_free_ones():
    assert source_answers_on("auto", "small") and not source_answers_on("auto", "large") and not source_answers_on("auto", None)
    assert source_answers_on("on", "large") and not source_answers_on("off", "small")
    settings = load_settings(source_answers="off", source_answer_policy={"candidates": 4, "min_similarity": 0.5})
    assert settings.source_answers == "off" and settings.source_answer_policy.candidates == 4
    with pytest.raises(ConfigError):
        load_settings(source_answer_policy={"candidates": 0})


def test_known_texts_are_embedded_once_and_the_least_recent_dropped():
    from server.text_vectors import TextVectors

    class Counting:
        def __init__(self):
            self.asked: list[list[str]] = []

        async def embed(self, texts):
            self.asked.append(list(texts))
            return np.stack([np.full(2, float(len(t))) for t in texts])

    embedder, cache = Counting(), TextVectors(size=2)
    got = asyncio.run(cache.get(embedder, ["a", "bb", "a"]))
    assert embedder.asked == [["a", "bb"]] and got["bb"][0] == 2.0
    asyncio.run(cache.get(embedder, ["a", "ccc"]))  # "bb" is now the least recent: dropped
    asyncio.run(cache.get(embedder, ["a", "bb"]))
    assert embedder.asked == [["a", "bb"], ["ccc"], ["bb"]]
