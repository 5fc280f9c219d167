"""Evidence: the sentences a turn's answer may be built from.

Two kinds: sentences of the knowledge sources the model was shown (cited by their
number, as the sources block numbers them), and what the user told the assistant: their
recalled memories and their own earlier messages in the conversation. An answer built
from evidence quotes one of these sentences, so a small model cannot invent a policy or
misremember an order number (server/turn/source_answer.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from server.memory.chunking import split_sentences

# Fewer words than this is a fragment (a heading, "Thanks!"), never an answer.
MIN_WORDS = 3
MAX_WORDS = 80
# A request that asks something: the user's earlier words answer only questions (a
# request to write or rephrase is not answered by quoting them back).
_QUESTION = re.compile(
    r"\?\s*$|^\s*(what|which|who|whom|whose|when|where|why|how|is|are|am|was|were|do|does|did|can|could|"
    r"should|will|would|may|have|has|tell me|remind me)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Sentence:
    text: str
    source: int | None  # the knowledge source's number ([n]); None: the user's own words
    context: str = ""  # what the sentence is about (its section heading), for ranking

    @property
    def told(self) -> bool:
        return self.source is None

    def ranked_text(self) -> str:
        return f"{self.context}: {self.text}" if self.context else self.text


def is_question(text: str) -> bool:
    return bool(_QUESTION.search(text))


def _sentences(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip().lstrip("#-*> ").strip()
        for s in split_sentences(line):
            if MIN_WORDS <= len(s.split()) <= MAX_WORDS and not s.endswith("?"):
                out.append(s)
    return out


def knowledge_sentences(sources: list[Any]) -> list[Sentence]:
    """The sentences of each source shown to the model (a chunk is its heading path, a
    newline, then its body), numbered as the sources block numbers them."""
    out: list[Sentence] = []
    for n, hit in enumerate(sources, start=1):
        heading, _, body = hit.text.partition("\n")
        if not body:
            heading, body = "", heading
        context = heading.split(" > ")[-1].strip()
        out += [Sentence(s, n, context) for s in _sentences(body)]
    return out


def told_sentences(recalled: list[Any], messages: list[dict[str, Any]]) -> list[Sentence]:
    """What the user said before the last message: recalled memories and their earlier
    messages of this conversation (statements only; questions answer nothing)."""
    said = [m.text for m in recalled]
    users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    said += users[:-1]
    seen: set[str] = set()
    out = []
    for text in said:
        for s in _sentences(text):
            if s not in seen:
                seen.add(s)
                out.append(Sentence(s, None))
    return out


def evidence(ctx: Any, messages: list[dict[str, Any]], query: str) -> list[Sentence]:
    """Every sentence the turn's answer may quote. The user's words count only when the
    query asks something."""
    found = knowledge_sentences(ctx.sources)
    if is_question(query):
        found += told_sentences(ctx.recalled, messages)
    return found
