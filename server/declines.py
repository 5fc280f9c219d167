"""The model declining a request the rails let through ("I'm sorry, but as a chatbot, I
don't have the ability to…").

Small models decline ordinary requests in their own words: SmolLM2-135M answers about a
quarter of support requests and a tenth of general ones that way (scripts/declines.py). Whether a request may be answered is the rails'
decision, not the model's (its refusals are luck either way), so an answer that opens by
declining a request the rails judged clearly benign is generated once more with the
phrases of declining ruled out. A request in the rails' uncertain band keeps the model's
decline. The policy is data in `rails/config.yml` (`model_declines`).

An answer is judged on its opening only: a decline comes first. Text that cannot start a
decline is released at once; text that might is held until it is one, or the opening is
complete without one (`DeclinePolicy.judge`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import regex  # partial matches: whether text so far can still become an opener


class Judgement(StrEnum):
    DECLINE = "decline"
    ANSWER = "answer"
    UNDECIDED = "undecided"


# A sentence ends at . ! ? or a line break followed by space or the end.
_SENTENCE_END = re.compile(r"[.!?\n](?=\s|$)")


@dataclass(frozen=True)
class DeclinePolicy:
    declines: re.Pattern  # a decline, anywhere in the opening
    openers: regex.Pattern  # how an opening that may decline starts
    hedges: re.Pattern  # a first sentence with one of these may go on to decline
    avoid: tuple[str, ...]  # phrases the second generation may not produce
    retry_below: float  # retried when the request's P(harmful) is below this
    opening_chars: int  # the opening is at most this long

    @classmethod
    def from_config(cls, data: dict[str, Any] | None) -> DeclinePolicy | None:
        """The policy of `custom_data.enclave.model_declines`; None when absent or off."""
        if not data or not data.get("enabled", True):
            return None

        def any_of(patterns: list[str]) -> re.Pattern:
            return re.compile("|".join(f"(?:{p})" for p in patterns or ["(?!)"]), re.IGNORECASE)

        return cls(
            declines=any_of(data.get("patterns") or []),
            openers=regex.compile(r"\s*(?:" + "|".join(data.get("openers") or ["(?!)"]) + ")", regex.IGNORECASE),
            hedges=any_of(data.get("hedges") or []),
            avoid=tuple(str(p) for p in data.get("avoid") or []),
            retry_below=float(data.get("retry_below", 0.3)),
            opening_chars=int(data.get("opening_chars", 240)),
        )

    def judge(self, text: str, final: bool) -> Judgement:
        """Whether an answer's text so far declines (`final`: the answer is complete)."""
        opening = text.replace("\u2019", "'")[: self.opening_chars]
        if self.declines.search(opening):
            return Judgement.DECLINE
        if final or len(opening) >= self.opening_chars:
            return Judgement.ANSWER
        opener = self.openers.match(opening, partial=True)
        if opener is None:
            return Judgement.ANSWER  # cannot become an opener ("To return an item…")
        if opener.partial:
            return Judgement.UNDECIDED  # "I'm s" may still be "I'm sorry"
        stripped = opening.lstrip()
        ends = [m.end() for m in _SENTENCE_END.finditer(stripped)]
        if ends and not self.hedges.search(stripped[: ends[0]]):
            return Judgement.ANSWER  # a first sentence that does not hedge
        if len(ends) >= 2:
            return Judgement.ANSWER  # declines come in the first two sentences
        return Judgement.UNDECIDED

    def reason(self, text: str) -> str:
        found = self.declines.search(text.replace("\u2019", "'")[: self.opening_chars])
        return f"the model declined: {found.group(0)!r}" if found else "the model declined"
