"""Tool choice beyond the model's own guess: the tools of a turn ranked against what the
user asked, before generation, and only the best offered to the model.

A 135M model shown four tools calls the first plausible one for almost every request;
shown the one or two that fit, it only has to fill in the arguments. The ranking is the
server's local embedding model (the one the rails and retrieval already use: the user's
message is embedded once per turn) over each tool's text (its name in words, its
description, its parameter names, and the example requests a pack declares), plus what
the conversation says about the tool's identifiers: a tool whose required id (a
parameter with a `pattern`) is written in the conversation gains, one whose id is absent
loses (server/toolcalls/grounding.py finds them).

The leader is offered alone when it leads the next tool by `margin`; otherwise the best
`size` are, and the constraint lets the model decide among them. Under
`tool_choice: auto` the ranking also decides whether to call at all: a small model
shown tools answers in prose almost always, so when the leader's score reaches
`call_at` (`call_at_cards` for a tool known by its card only) the turn's first step must
call one of the tools offered (as under `required`); below it, the model chooses between
calling and answering, as before. The settings were chosen on a development split of
requests (evals/dev/tool_selection.jsonl, `scripts/tune_shortlist.py`; the call decision
by `scripts/tune_tool_decision.py`, with requests that need no tool), never on the eval
set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.text_vectors import TextVectors
from server.toolcalls.grounding import grounded_fields
from server.toolcalls.spec import ToolSpec

# Tool texts embedded so far (a deployment has a few packs; clients resend the same tools
# every turn): at most this many are kept.
MAX_CACHED_TOOLS = 1024


@dataclass(frozen=True)
class ShortlistPolicy:
    """How many tools a turn offers and when one is enough (`ENCLAVE_TOOL_SHORTLIST`)."""

    size: int = 2  # most tools offered; 0: every tool, no ranking
    margin: float = 0.03  # the leader alone when its score leads the next by this much
    id_found: float = 0.25  # per required identifier written in the conversation
    id_missing: float = 0.25  # per required identifier that is not
    # Under auto: the leader's score from which the turn calls (None: the model decides),
    # for a tool that declares example requests, and for one known by its card only (a
    # client's: OpenAI's tool format has no examples, and cards alone score lower).
    call_at: float | None = 0.525
    call_at_cards: float = 0.325


@dataclass(frozen=True)
class Ranked:
    tool: ToolSpec
    score: float  # similarity to the request, moved by what its identifiers found
    similarity: float


def tool_texts(tool: ToolSpec) -> list[str]:
    """What a tool is embedded as: its card, then each example request it declares."""
    params = ", ".join(p.replace("_", " ") for p in (tool.parameters.get("properties") or {}))
    card = f"{tool.name.replace('_', ' ')}: {tool.description}" + (f" Parameters: {params}." if params else "")
    return [card, *tool.asks]


def query_text(messages: list[dict[str, Any]]) -> str:
    """What the ranking reads: the user's last message."""
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


class Shortlister:
    def __init__(self, embedder: Any, policy: ShortlistPolicy):
        """`embedder`: a handle whose `.value` is the server's Embedder (None until loaded)."""
        self.embedder_handle = embedder
        self.policy = policy
        self._vectors = TextVectors(MAX_CACHED_TOOLS)

    def applies(self, tools: list[ToolSpec], choice: str) -> bool:
        """Whether a turn's tools are ranked: to shortlist more than one, or to decide
        whether an `auto` turn calls."""
        if self.policy.size == 0 or choice not in ("auto", "required") or self.embedder_handle.value is None or not tools:
            return False
        return len(tools) > 1 or (choice == "auto" and self.policy.call_at is not None)

    def must_call(self, ranked: list[Ranked]) -> bool:
        """Under `auto`: whether the request clearly asks for a tool (the leader's score
        reaches `call_at`), so the first step calls instead of leaving it to the model."""
        if self.policy.call_at is None or not ranked:
            return False
        leader = ranked[0]
        return leader.score >= (self.policy.call_at if leader.tool.asks else self.policy.call_at_cards)

    async def rank(self, query: str, tools: list[ToolSpec], conversation: str) -> list[Ranked]:
        """`tools` best first for `query` (the user's message), with `conversation` (what
        was said) deciding on identifiers."""
        texts = {t.name: tool_texts(t) for t in tools}
        vectors = await self._vectors.get(self.embedder_handle.value, [x for xs in texts.values() for x in xs])
        q = await self.embedder_handle.value.embed_one(query)
        out = []
        for t in tools:
            similarity = max(float(q @ vectors[x]) for x in texts[t.name])
            found, missing = grounded_fields(t.parameters, conversation)
            out.append(Ranked(t, similarity + self.policy.id_found * found - self.policy.id_missing * missing, similarity))
        return sorted(out, key=lambda r: -r.score)

    def pick(self, ranked: list[Ranked]) -> list[ToolSpec]:
        """The tools offered: the leader alone when it leads clearly, else the best few."""
        if len(ranked) > 1 and ranked[0].score - ranked[1].score >= self.policy.margin:
            return [ranked[0].tool]
        return [r.tool for r in ranked[: self.policy.size]]

    async def shortlist(self, tools: list[ToolSpec], messages: list[dict[str, Any]], conversation: str) -> tuple[list[ToolSpec], list[Ranked]]:
        query = query_text(messages)
        if not query.strip():
            return tools, []
        ranked = await self.rank(query, tools, conversation)
        return self.pick(ranked), ranked
