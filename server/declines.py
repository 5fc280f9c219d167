"""The model declining a request the rails let through ("I'm sorry, but as a chatbot, I
don't have the ability to…").

Small models decline ordinary requests in their own words: SmolLM2-135M answers about a
quarter of support requests and a tenth of general ones that way (scripts/declines.py). Whether a request may be answered is the rails'
decision, not the model's (its refusals are luck either way), so an answer that declines,
in its opening, a request the rails judged clearly benign is continued with the phrases
of declining ruled out. A request in the rails' uncertain band keeps the model's
decline. With `prevent`, a request scored below the band is generated with those phrases
ruled out from the start, so that its decline never has to be seen and retried (the
retry stays, for declines in other words). The policy is data in `rails/config.yml`
(`model_declines`).

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

from server.spellings import spellings

# How far an apology may be from the decline it introduces, within one sentence.
_SENTENCE_CHARS = 160


# Where a word starts: not after a letter, nor after an apostrophe (the "m" of "I'm" is
# not the start of "my apologies").
_WORD_START = r"(?<![\w'])"


def _any_of(patterns: list[str]) -> str:
    # A leading \b is read as "a word starts here" (the same before the word it starts):
    # \b cannot match at the end of text, which is where the next word of a decline
    # still being generated would start ("…misunderstanding," before " but as a…").
    return "|".join("(?:" + (_WORD_START + p[2:] if p.startswith(r"\b") else p) + ")" for p in patterns)


def _compiled(patterns: list[str], apologies: list[str]) -> regex.Pattern:
    either = _any_of(patterns or ["(?!)"])
    if apologies:
        either = rf"(?:{_WORD_START}(?:{_any_of(apologies)})[^.!?\n]{{0,{_SENTENCE_CHARS}}})?(?:{either})"
    return regex.compile(either, regex.IGNORECASE)


def _ruled_out(pattern: str, avoid: tuple[str, ...]) -> bool:
    """Whether everything `pattern` matches, as the model writes it, begins with one of
    the `avoid` phrases (which vLLM's bad_words match exactly): then a generation with
    them ruled out cannot produce it. The model writes the pronoun "I" capitalised and
    the first word either way ("unfortunately" mid-sentence is not "Unfortunately")."""
    found = spellings(pattern)
    if not found:
        return False  # open ("as a … bot"): its words cannot all be listed

    def written(s: str) -> set[str]:
        s = regex.sub(r"(?<!\w)i(?!\w)", "I", s)
        return {s, s[:1].upper() + s[1:]}

    return all(w.startswith(avoid) for s in found for w in written(s))


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
    # The declines a generation with `avoid` ruled out can still produce (patterns whose
    # words cannot all be listed, or not all of which `avoid` begins): all that is looked
    # for in a prevented generation. None: none.
    unavoided: regex.Pattern | None
    avoid: tuple[str, ...]  # phrases the continuation may not produce
    # The first generation of a request below `retry_below` rules out `avoid` from the
    # start (a decline prevented costs nothing; one retried costs its first token's wait).
    prevent: bool
    retry_below: float  # retried when the request's P(harmful) is below this
    opening_chars: int  # the opening is at most this long

    @classmethod
    def from_config(cls, data: dict[str, Any] | None) -> DeclinePolicy | None:
        """The policy of `custom_data.enclave.model_declines`; None when absent or off."""
        if not data or not data.get("enabled", True):
            return None
        avoid = tuple(str(p) for p in data.get("avoid") or [])
        patterns = [str(p) for p in data.get("patterns") or []]
        # An apology that opens the sentence of a decline is part of it ("I'm sorry for any
        # confusion, but as a chatbot…"): held with it, and not kept when it is retried.
        apologies = [str(p) for p in data.get("apologies") or []]
        unavoided = [p for p in patterns if not _ruled_out(p, avoid)]
        return cls(
            declines=_compiled(patterns, apologies),
            unavoided=_compiled(unavoided, [a for a in apologies if not _ruled_out(a, avoid)]) if unavoided else None,
            avoid=avoid,
            prevent=bool(data.get("prevent", False)),
            retry_below=float(data.get("retry_below", 0.3)),
            opening_chars=int(data.get("opening_chars", 240)),
        )

    def scan(self, text: str, final: bool, prevented: bool = False) -> Scan:
        """Whether an answer's text so far declines, and how much of it may be shown
        (`final`: the answer is complete; `prevented`: it was generated with `avoid` ruled
        out, so only declines in other words can be starting in it)."""
        declines = self.unavoided if prevented else self.declines
        if declines is None:
            return Scan(Judgement.ANSWER, len(text))
        # Same length: positions in `opening` are positions in `text`.
        opening = text.replace("\u2019", "'")[: self.opening_chars]
        found = declines.search(opening)
        if found is not None:
            return Scan(Judgement.DECLINE, found.start())
        if final or len(opening) >= self.opening_chars:
            return Scan(Judgement.ANSWER, len(text))
        # The leftmost place a decline may still be starting ("I", "I'm no", "but as a
        # support"): held from there; the rest cannot be part of one.
        partial = declines.search(opening, partial=True)
        return Scan(Judgement.UNDECIDED, partial.start() if partial is not None else len(text))

    def avoid_after(self, decline: str) -> tuple[str, ...]:
        """The phrases a retry of `decline` (the text from where it starts) may not
        produce: `avoid`, and, when the decline does not begin with one of those (its
        words were not listed: "sorry for any misunderstanding, but as a chat AI"), its
        own first word, or first two after a pronoun, so that the retry cannot open the
        same way again."""
        decline = decline.replace("\u2019", "'").lstrip()
        if decline.startswith(self.avoid):
            return self.avoid
        words = regex.findall(r"[\w']+", decline)
        if not words:
            return self.avoid
        opening = " ".join(words[:2]) if words[0] in ("I", "I'm", "We", "We're") or len(words[0]) < 3 else words[0]
        return (*self.avoid, opening)

    def reason(self, text: str) -> str:
        found = self.declines.search(text.replace("\u2019", "'")[: self.opening_chars])
        return f"the model declined: {found.group(0)!r}" if found else "the model declined"
