"""The model declining a request the rails let through ("I'm sorry, but as a chatbot, I
don't have the ability to…").

Small models decline ordinary requests in their own words: SmolLM2-135M answers about a
quarter of support requests and a tenth of general ones that way (scripts/declines.py). Whether a request may be answered is the rails'
decision, not the model's (its refusals are luck either way), so an answer that declines,
in its opening, a request the rails judged clearly benign is continued with the phrases
of declining ruled out. A request in the rails' uncertain band keeps the model's
decline. The policy is data in `rails/config.yml` (`model_declines`).

An answer is judged on its opening only: a decline comes first. Nothing the client has
seen is taken back, so only what may still become a decline is held: the text from
where one could be starting ("I", "but as a…", an apology until its sentence ends) until
it is one or cannot be (`DeclinePolicy.scan`). Everything before it streams as it comes;
a retried answer goes on from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import regex  # partial matches: whether the text so far can still become a decline

# How far an apology may be from the decline it introduces, within one sentence.
_SENTENCE_CHARS = 160


def _any_of(patterns: list[str]) -> str:
    # A leading \b is read as "not after a letter" (the same before the word it starts):
    # \b cannot match at the end of text, which is where the next word of a decline
    # still being generated would start ("…misunderstanding," before " but as a…").
    return "|".join("(?:" + (r"(?<!\w)" + p[2:] if p.startswith(r"\b") else p) + ")" for p in patterns)


class Judgement(StrEnum):
    DECLINE = "decline"
    ANSWER = "answer"  # the opening is over without a decline: nothing more to judge
    UNDECIDED = "undecided"


@dataclass(frozen=True)
class Scan:
    judgement: Judgement
    # Characters of the text that may be shown now: for a decline, where it starts (the
    # retry goes on from there); for an answer, all of it.
    releasable: int


@dataclass(frozen=True)
class DeclinePolicy:
    declines: regex.Pattern  # a decline, anywhere in the opening
    avoid: tuple[str, ...]  # phrases the continuation may not produce
    retry_below: float  # retried when the request's P(harmful) is below this
    opening_chars: int  # the opening is at most this long

    @classmethod
    def from_config(cls, data: dict[str, Any] | None) -> DeclinePolicy | None:
        """The policy of `custom_data.enclave.model_declines`; None when absent or off."""
        if not data or not data.get("enabled", True):
            return None
        patterns = _any_of(data.get("patterns") or ["(?!)"])
        # An apology that opens the sentence of a decline is part of it ("I'm sorry for any
        # confusion, but as a chatbot…"): held with it, and not kept when it is retried.
        apologies = _any_of(data.get("apologies") or [])
        if apologies:
            patterns = rf"(?:(?<!\w)(?:{apologies})[^.!?\n]{{0,{_SENTENCE_CHARS}}})?(?:{patterns})"
        return cls(
            declines=regex.compile(patterns, regex.IGNORECASE),
            avoid=tuple(str(p) for p in data.get("avoid") or []),
            retry_below=float(data.get("retry_below", 0.3)),
            opening_chars=int(data.get("opening_chars", 240)),
        )

    def scan(self, text: str, final: bool) -> Scan:
        """Whether an answer's text so far declines, and how much of it may be shown
        (`final`: the answer is complete)."""
        # Same length: positions in `opening` are positions in `text`.
        opening = text.replace("\u2019", "'")[: self.opening_chars]
        found = self.declines.search(opening)
        if found is not None:
            return Scan(Judgement.DECLINE, found.start())
        if final or len(opening) >= self.opening_chars:
            return Scan(Judgement.ANSWER, len(text))
        # The leftmost place a decline may still be starting ("I", "I'm no", "but as a
        # support"): held from there; the rest cannot be part of one.
        partial = self.declines.search(opening, partial=True)
        return Scan(Judgement.UNDECIDED, partial.start() if partial is not None else len(text))

    def reason(self, text: str) -> str:
        found = self.declines.search(text.replace("\u2019", "'")[: self.opening_chars])
        return f"the model declined: {found.group(0)!r}" if found else "the model declined"
