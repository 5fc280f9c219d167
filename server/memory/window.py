"""The context window: every turn is assembled under a token budget.

Order of the prompt: one system message (instructions, the running summary of older
turns, recalled memories, retrieved sources), the most recent turns verbatim, then the
new input. Tokens are counted with the model's own tokenizer and the result is checked
by rendering the chat template, so the budget is exact, not estimated.

When the verbatim turns no longer fit, the window moves: the older turns are folded into
the running summary by the model itself, keeping about half the room for recent turns, so
the (slow) summary is refreshed every several turns rather than on every one. Sources
and memories shrink before the new input would; only an input that alone exceeds the
model's window is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.base import Engine, GenerationParams
from server.errors import ContextLengthExceededError
from server.ids import internal_id

log = logging.getLogger(__name__)

# Per-message tokens of the chat template around the content (ChatML: about 5).
_MESSAGE_OVERHEAD = 8
_CLIP_CHARS = 600  # of each message, in the summariser's transcript

SUMMARY_SYSTEM = (
    "You keep a running summary of a conversation between a user and an assistant. "
    "Keep names, numbers, dates, decisions, open questions and facts about the user. "
    "Write at most six short sentences, in the third person, and nothing else."
)


@dataclass
class Window:
    messages: list[dict[str, str]]
    verbatim_turns: int
    summary: str
    summary_through: int
    # Set when this turn moved the window: stored with the turn.
    new_summary: tuple[str, int] | None = None
    dropped_blocks: list[str] = field(default_factory=list)

    def info(self) -> dict[str, int | bool]:
        return {
            "verbatim_turns": self.verbatim_turns,
            "summarized_turns": self.summary_through,
            "summary_refreshed": self.new_summary is not None,
        }


def _tokens(engine: Engine, messages: Sequence[dict[str, str]]) -> int:
    return sum(engine.count_tokens(m.get("content") or "") + _MESSAGE_OVERHEAD for m in messages)


def system_text(instructions: str, summary: str, blocks: Sequence[str]) -> str:
    parts = [instructions.strip()] if instructions.strip() else []
    if summary:
        parts.append("Summary of the earlier conversation:\n" + summary.strip())
    parts.extend(b for b in blocks if b)
    return "\n\n".join(parts)


class ContextWindow:
    def __init__(self, engine: Engine, summary_tokens: int = 160):
        self.engine = engine
        self.summary_tokens = summary_tokens

    async def assemble(
        self,
        instructions: str,
        blocks: list[str],
        turns: list[tuple[int, list[dict[str, str]]]],
        summary: str,
        summary_through: int,
        new_messages: list[dict[str, str]],
        budget: int,
        request_id: str,
    ) -> Window:
        """Messages for the next generation, at most `budget` prompt tokens.

        `blocks` are optional system sections in priority order (the last is dropped
        first); `turns` are the stored turns after `summary_through`, oldest first."""
        blocks = list(blocks)
        dropped: list[str] = []
        # Room for the summary to grow; a small window cannot give it the full cap.
        summary_room = min(self.summary_tokens, budget // 4)

        def fixed_tokens() -> int:
            system = system_text(instructions, summary, blocks)
            return _tokens(self.engine, [{"content": system}, *new_messages]) + summary_room

        while fixed_tokens() > budget and blocks:
            dropped.append(blocks.pop())
        if fixed_tokens() > budget:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.engine.max_model_len} tokens and this input alone "
                f"needs more than the {budget} tokens left for it. Please shorten the input.",
                param="input",
            )
        room = budget - fixed_tokens()
        sizes = [_tokens(self.engine, msgs) for _, msgs in turns]
        new_summary = None
        if sum(sizes) > room:
            # Move the window: keep the newest turns in half the room, fold the rest.
            keep, used = len(turns), 0
            while keep > 0 and used + sizes[keep - 1] <= room // 2:
                keep -= 1
                used += sizes[keep]
            folded, turns = turns[:keep], turns[keep:]
            summary = await self.summarize(summary, folded, request_id, summary_room)
            summary_through = folded[-1][0]
            new_summary = (summary, summary_through)
        window = self._build(instructions, summary, blocks, turns, new_messages, summary_through, new_summary)
        # The count above is per message; the rendered template is the truth. Drop the
        # oldest verbatim turns (then blocks) until it fits; rarely needed.
        while len(self.engine.render_chat(window.messages)) > budget and (turns or blocks):
            if turns:
                turns = turns[1:]
            else:
                dropped.append(blocks.pop())
            window = self._build(instructions, summary, blocks, turns, new_messages, summary_through, new_summary)
        window.dropped_blocks = dropped
        return window

    @staticmethod
    def _build(instructions, summary, blocks, turns, new_messages, summary_through, new_summary) -> Window:
        system = system_text(instructions, summary, blocks)
        messages = ([{"role": "system", "content": system}] if system else []) + [m for _, msgs in turns for m in msgs] + list(new_messages)
        return Window(messages, len(turns), summary, summary_through, new_summary)

    # ---------------------------------------------------------------- summaries

    async def summarize(self, previous: str, turns: list[tuple[int, list[dict[str, str]]]], request_id: str, max_tokens: int) -> str:
        """Fold `turns` into `previous`, in as many model calls as the window needs."""
        lines = [_transcript_line(m) for _, msgs in turns for m in msgs]
        lines = [line for line in lines if line]
        summary = previous
        limit = self.engine.max_model_len - max_tokens - 96
        while lines:
            batch: list[str] = []
            while lines:
                candidate = batch + [lines[0]]
                if batch and self.engine.count_tokens(_summary_prompt(summary, candidate)) > limit:
                    break
                batch.append(lines.pop(0))
            summary = await self._summarize_once(summary, batch, request_id, max_tokens)
        return summary

    async def _summarize_once(self, previous: str, lines: list[str], request_id: str, max_tokens: int) -> str:
        messages = [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": _summary_prompt(previous, lines)}]
        prompt = self.engine.render_chat(messages)
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.15)
        text = ""
        try:
            async for chunk in self.engine.generate(internal_id(f"{request_id}-summary", short=True), prompt, params):
                text += chunk.text
                if chunk.finish_reason == "error":
                    text = ""
                    break
        except Exception:  # a summary is an optimisation of the context, never a reason to fail the turn
            log.exception("summarising the conversation failed; falling back to an extract")
            text = ""
        text = text.strip()
        if len(text.split()) < 4:
            # The model gave nothing usable: keep an extract so the facts are not lost.
            text = " ".join(filter(None, [previous, *(line[:160] for line in lines if line.startswith("User:"))]))
        return _clip_tokens(self.engine, text, max_tokens)


def _transcript_line(message: dict[str, str]) -> str:
    content = " ".join((message.get("content") or "").split())[:_CLIP_CHARS]
    if not content:
        return ""
    role = {"user": "User", "assistant": "Assistant", "tool": "Tool result"}.get(message.get("role", ""), "Note")
    return f"{role}: {content}"


def _summary_prompt(previous: str, lines: list[str]) -> str:
    head = f"Summary so far:\n{previous}\n\n" if previous else ""
    return head + "New part of the conversation:\n" + "\n".join(lines) + "\n\nWrite the updated summary."


def _clip_tokens(engine: Engine, text: str, limit: int) -> str:
    words = text.split()
    while words and engine.count_tokens(" ".join(words)) > limit:
        words = words[: max(1, int(len(words) * 0.8))] if len(words) > 1 else []
    return " ".join(words)
