"""The cache stage: a turn answered from the response cache, or its answer kept there.

It sits where generation starts (after the input rails, context assembly and the
prompt): the input rails have run on the question by then (or are deciding alongside,
and the gate holds a hit back until they pass), so a refused or rewritten question never
reaches the cache. A hit replays the kept answer as the turn's events and no model runs;
a miss generates as usual and keeps what the client was sent, after the output rails.

Which turns: the deployment's mode and the request's `cache` field say whether to use it
at all; then only plain answers are kept (no tools, one choice, no logprobs), since a
turn that calls tools acts rather than answers. An answer is personal, kept for its user
only, when it read that user's memories, stored conversation or personal data (the input
rails' masks in the messages); otherwise the tenant's users share it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.memory.knowledge import KnowledgeBase
from server.memory.response_cache import CacheKey, ResponseCache, digest
from server.protocol import CacheControl
from server.telemetry import tracing
from server.telemetry.metrics import Metrics
from server.telemetry.redaction import LABELS
from server.turn.events import Choice, Kind, TurnEvent
from server.turn.state import Progress, Turn

log = logging.getLogger(__name__)

_MASKS = tuple(sorted(set(LABELS.values())))
_KEPT = ("stop", "length")  # finish reasons of answers worth giving again


class CacheStage:
    def __init__(self, cache: ResponseCache, knowledge: KnowledgeBase, model: str, metrics: Metrics, policy: Any = None):
        """`policy`: what else decides an answer (the rails' configuration): a change to
        it is a change of every key, so answers checked under the old rails are not given."""
        self.cache = cache
        self.knowledge = knowledge
        self.model = model
        self.policy = digest(policy) if policy is not None else ""
        self._results = {r: metrics.response_cache.labels(model=model, result=r) for r in ("hit_exact", "hit_semantic", "miss", "stored")}

    def applies(self, turn: Turn) -> bool:
        mode, asked = self.cache.config.mode, turn.req.request.cache
        if mode == "off" or asked is False or (mode == "opt_in" and asked is None):
            return False
        params, messages = turn.step.params, turn.step.messages
        if turn.req.plan is not None or params.n != 1 or params.logprobs is not None:
            return False
        return bool(messages) and messages[-1]["role"] == "user" and bool(messages[-1].get("content"))

    async def key(self, turn: Turn) -> CacheKey:
        messages = turn.step.messages
        question = messages[-1]["content"]
        request = turn.req.request
        asked_max = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        # The requested length, not the one derived from the prompt's (which differs
        # with the question's length and would split semantic matches).
        params = {**dataclasses.asdict(turn.step.params), "max_tokens": asked_max, "policy": self.policy}
        personal = any(mask in (m.get("content") or "") for m in messages for mask in _MASKS)
        ctx = turn.context
        if ctx is None:
            context: Any = messages[:-1]
        else:
            window = ctx.window
            history_turns = bool(window and (window.verbatim_turns or window.summary))
            personal = personal or bool(ctx.recalled) or history_turns
            new = len(ctx.new_messages)
            shown = window.messages if window is not None else messages
            first = 1 if shown and shown[0]["role"] == "system" else 0
            # The retrieved sources are not part of it (a paraphrase may retrieve other
            # chunks of the same store): the stores' digests stand for them instead.
            stores = await asyncio.to_thread(self.knowledge.fingerprints, turn.req.principal.tenant, ctx.vector_store_ids) if ctx.vector_store_ids else {}
            context = {
                "instructions": ctx.instructions,
                "summary": window.summary if window is not None else "",
                "history": shown[first : len(shown) - new],
                "new": ctx.new_messages[:-1],
                "memories": [m.text for m in ctx.recalled],
                "stores": stores,
            }
        principal = turn.req.principal
        return CacheKey.of(principal.tenant, principal.user if personal else None, self.model, params, context, question)

    async def events(self, turn: Turn, progress: Progress, fresh: Callable[[], AsyncIterator[TurnEvent]]) -> AsyncIterator[TurnEvent]:
        control = turn.req.request.cache
        key = await self.key(turn)
        with tracing.span("cache lookup", enclave__cache__scope="user" if key.user else "tenant") as span:
            hit = None
            if not (isinstance(control, CacheControl) and control.no_cache):
                try:
                    hit = await self.cache.lookup(key)
                except Exception:  # the cache is an optimisation: its failure is a miss, never the turn's
                    log.warning("response cache: lookup failed; answering afresh", exc_info=True)
            tracing.set_attributes(span, enclave__cache__result=f"hit_{hit.kind}" if hit else "miss", enclave__cache__entry=hit.entry_id if hit else None)
        if hit is not None:
            self._results[f"hit_{hit.kind}"].inc()
            turn.report.cache = hit.public()
            yield TurnEvent(Kind.TEXT, 0, hit.answer)
            yield TurnEvent.finish(0, hit.finish_reason)
            return
        self._results["miss"].inc()
        turn.report.cache = {"status": "miss"}
        answer = Choice()
        async for ev in fresh():
            if ev.index == 0:
                answer.add(ev)
            yield ev
        keep = not (isinstance(control, CacheControl) and control.no_store)
        if keep and answer.finish_reason in _KEPT and not answer.calls and answer.text and turn.report.refusal is None:
            try:
                entry = await self.cache.store(key, answer.text, answer.finish_reason)  # type: ignore[arg-type]
            except Exception:  # the answer was sent; not keeping it loses nothing acknowledged
                log.warning("response cache: storing an answer failed", exc_info=True)
                return
            turn.report.cache = {"status": "miss", "stored": entry}
            self._results["stored"].inc()
