"""The source-answer stage: when a turn has evidence (knowledge sources, or what the user
told the assistant), its answer is a sentence of that evidence, cited, rather than
whatever a small model writes around it.

A 135M model shown the right source still invents prices and periods ("Standard delivery
takes 2 to 3 days"); asked for an order number the user gave two turns ago, it writes a
new one. Here the evidence's sentences (server/memory/evidence.py) are ranked by the
local embedding model against the user's question; the best `candidates` are numbered,
and the model chooses among them with one constrained token (its probabilities, weighted
by `model_weight`, move the ranking). The answer is the chosen sentence with its source
number ("… [2]"), or the user's own words quoted back. When no sentence is similar
enough to the question (`min_similarity`), nothing is quoted and the model answers as
usual, its sources still in the prompt.

Only a plain text answer of one choice is built this way (no tools offered, no JSON, no
logprobs asked for). The settings were chosen on development questions
(evals/dev/grounded.jsonl, evals/dev/memory.jsonl; `scripts/tune_source_answers.py`),
never on the eval set. `ENCLAVE_SOURCE_ANSWERS` turns the stage on or off per
deployment; by default it is on for models of the `small` tier.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.config import SourceAnswerPolicy
from server.engine.base import Engine, GenerationParams
from server.memory.evidence import Sentence, evidence
from server.text_vectors import TextVectors
from server.turn.events import Kind, TurnEvent
from server.turn.generation import Generation
from server.turn.state import Progress, Step, Turn

log = logging.getLogger(__name__)

CHOICE_PROMPT = (
    "Numbered sentences from the sources and from what the user said earlier:\n{numbered}\n\n"
    "Which sentence answers the user's question? Reply with its number only."
)
# Sentence vectors kept between turns (the same knowledge is searched again and again).
MAX_CACHED = 4096


def source_answers_on(mode: str, tier: str | None) -> bool:
    """ENCLAVE_SOURCE_ANSWERS for a model of `tier` (None: no profile, as in unit tests)."""
    return mode == "on" or (mode == "auto" and tier == "small")


@dataclass(frozen=True)
class Chosen:
    sentence: Sentence

    def text(self) -> str:
        s = self.sentence
        return f"You told me earlier: \u201c{s.text}\u201d" if s.told else f"{s.text} [{s.source}]"


class SourceAnswer:
    def __init__(self, embedder: Any, engine: Engine, generation: Generation, policy: SourceAnswerPolicy):
        """`embedder`: a handle whose `.value` is the server's Embedder (None until loaded)."""
        self.embedder_handle = embedder
        self.engine = engine
        self.generation = generation
        self.policy = policy
        self._vectors = TextVectors(MAX_CACHED)

    def applies(self, turn: Turn) -> bool:
        ctx, params = turn.context, turn.step.params
        return (
            ctx is not None
            and self.embedder_handle.value is not None
            and params.n == 1
            and params.regex is None
            and params.json_schema is None
            and params.logprobs is None
            and turn.step.tool_choice == "none"
        )

    async def events(self, turn: Turn, progress: Progress, otherwise: Callable[[], AsyncIterator[TurnEvent]]) -> AsyncIterator[TurnEvent]:
        """The answer from evidence, or `otherwise()`'s events when no sentence answers."""
        try:
            chosen = await self.choose(turn, progress)
        except Exception:  # the embedding or the choice failed: answer as without the stage
            log.warning("answering from sources failed; the model answers freely", exc_info=True)
            chosen = None
        if chosen is None:
            async for ev in otherwise():
                yield ev
            return
        yield TurnEvent(Kind.TEXT, 0, chosen.text())
        yield TurnEvent.finish(0, "stop")

    async def choose(self, turn: Turn, progress: Progress) -> Chosen | None:
        ctx = turn.context
        assert ctx is not None
        sentences = evidence(ctx, turn.step.messages, ctx.query)
        if not sentences:
            return None
        sims = await self.similarities(ctx.query, sentences)
        order = [int(i) for i in np.argsort(-sims, kind="stable")[: self.policy.candidates]]
        if sims[order[0]] < self.policy.min_similarity:
            turn.report.source_answer = {"answered": False, "candidates": [_public(sentences[i], sims[i]) for i in order]}
            return None
        scores = {i: float(sims[i]) for i in order}
        probs: dict[int, float] = {}
        if self.policy.model_weight > 0 and len(order) > 1:
            probs = dict(zip(order, await self.model_choice(turn, progress, [sentences[i] for i in order]), strict=True))
            for i, p in probs.items():
                scores[i] += self.policy.model_weight * p
        best = max(order, key=lambda i: scores[i])
        turn.report.source_answer = {
            "answered": True,
            "chosen": order.index(best),
            "candidates": [_public(sentences[i], sims[i], probs.get(i)) for i in order],
        }
        return Chosen(sentences[best])

    async def similarities(self, query: str, sentences: list[Sentence]) -> np.ndarray:
        embedder = self.embedder_handle.value
        texts = [s.ranked_text() for s in sentences]
        vectors = await self._vectors.get(embedder, texts)
        q = await embedder.embed_one(query)
        return np.array([float(vectors[t] @ q) for t in texts])

    async def model_choice(self, turn: Turn, progress: Progress, candidates: list[Sentence]) -> list[float]:
        """The model's probability for each candidate: one token, constrained to the
        candidates' numbers, read from its log-probabilities."""
        ctx = turn.context
        assert ctx is not None
        labels = [str(i + 1) for i in range(len(candidates))]
        numbered = "\n".join(f"{label}. {s.text}" for label, s in zip(labels, candidates, strict=True))
        messages = [{"role": "system", "content": CHOICE_PROMPT.format(numbered=numbered)}, {"role": "user", "content": ctx.query}]
        params = GenerationParams(max_tokens=1, temperature=0.0, regex=f"[1-{len(labels)}]", logprobs=20)
        answer_step = turn.step
        turn.step = Step(messages, self.engine.render_chat(messages), params, "none")
        logprob = dict.fromkeys(labels, -math.inf)
        try:
            async for chunk in self.generation.generate(turn, progress, f"{turn.engine_request_id}-choice"):
                for entry in chunk.logprobs or []:
                    for token, lp in ((entry.token, entry.logprob), *entry.top):
                        token = token.strip()
                        if token in logprob:
                            logprob[token] = max(logprob[token], lp)
        finally:
            turn.step = answer_step
        top = max(logprob.values())
        if top == -math.inf:
            return [0.0] * len(labels)
        weights = [math.exp(logprob[label] - top) for label in labels]
        total = sum(weights)
        return [w / total for w in weights]


def _public(s: Sentence, similarity: float, p_model: float | None = None) -> dict[str, Any]:
    """A candidate as the response reports it (`source_answer`)."""
    out: dict[str, Any] = {"text": s.text, "source": s.source if s.source is not None else "user", "similarity": round(float(similarity), 4)}
    if p_model is not None:
        out["p_model"] = round(p_model, 4)
    return out
