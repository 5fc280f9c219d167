"""The training data of the intent classifier (server/intents.py), assembled from:

- the reference intents written for this project (rails/intents/reference.jsonl);
- the project's own red-team and benign sets (tests/redteam);
- the `dev` part of the outside corpora (evals/redteam/corpora.py), each family under the
  intent its attacks carry, and the dev part of the benign set.

Never a `heldout` prompt (`examples` refuses one), and never the golden eval datasets
(evals/datasets): the figures that count are measured on what training never saw.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from evals.redteam import corpora
from server.intents import BENIGN, INSTRUCTION, sentences

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "rails" / "intents" / "reference.jsonl"
# Benign markdown for the data classifier: sentences of the project's docs (docs/*.md but
# redteam.md), frozen when the shipped classifier was trained.
MARKDOWN = ROOT / "evals" / "redteam" / "markdown.jsonl"

# The intent each outside family's attacks carry.
FAMILY_INTENT = {
    "dan": "jailbreak", "tap": "jailbreak", "dra": "jailbreak", "grandma": "jailbreak", "smuggling": "jailbreak",
    "suffix": "jailbreak", "goodside": "jailbreak", "promptinject": "injection", "exploitation": "injection",
    "encoding": "encoded", "web_injection": "exfiltration", "malwaregen": "malware", "harmbench": "harmful",
    "phrasing": "harmful", "donotanswer": "harmful", "apikey": "credentials", "propile": "personal_data",
    "sysprompt_extraction": "extraction",
}
# The project's own red-team categories (tests/redteam/attacks.jsonl) as intents; its
# indirect categories are documents, not messages, and stay out.
OWN_INTENT = {"injection": "injection", "jailbreak": "jailbreak", "system_prompt_extraction": "extraction", "pii_exfiltration": "personal_data"}
# At most this many dev prompts of one family: the largest (encoding) would drown the rest.
PER_FAMILY = 220


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def examples() -> list[tuple[str, str]]:
    """The message classifier's (text, intent) pairs."""
    # "planted" references are sentences planted in data, for the data classifier only.
    out: list[tuple[str, str]] = [(r["text"], r["intent"]) for r in _jsonl(REFERENCE) if r["intent"] != "planted"]
    for r in _jsonl(ROOT / "tests" / "redteam" / "attacks.jsonl"):
        if r.get("category") in OWN_INTENT:
            out.append((r["text"], OWN_INTENT[r["category"]]))
    out += [(r["text"], BENIGN) for name in ("benign.jsonl", "offtopic.jsonl") for r in _jsonl(ROOT / "tests" / "redteam" / name)]
    outside = corpora.select(corpora.attacks(), "dev")
    counts: dict[str, int] = {}
    for p in sorted(outside, key=lambda p: p.key):
        assert p.split == "dev"
        if p.path != "input" or counts.get(p.family, 0) >= PER_FAMILY:
            continue
        # What a rail is not expected to stop is left out: neither attack nor clearly benign.
        if not (p.expected and p.family in FAMILY_INTENT):
            continue
        out.append((p.text, FAMILY_INTENT[p.family]))
        counts[p.family] = counts.get(p.family, 0) + 1
    out += [(p.text, BENIGN) for p in corpora.benign() if p.split == "dev"]
    _refuse_heldout(out)
    return out


# Dev documents with a planted instruction, per probe class (the Full variants hold
# thousands of near-copies).
PER_SOURCE = 80


def data_examples() -> list[tuple[str, str]]:
    """The data classifier's (sentence, label) pairs: sentences that address the model
    (INSTRUCTION) and sentences of ordinary documents and requests (BENIGN). Its unit is
    a sentence, as the data rails remove them one at a time."""
    out: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    documents = [p for p in corpora.select(corpora.attacks(["latentinjection"]), "dev") if p.planted]
    for p in sorted(documents, key=lambda p: p.key):
        if counts.get(p.source, 0) >= PER_SOURCE:
            continue
        counts[p.source] = counts.get(p.source, 0) + 1
        planted = sentences(p.planted)
        out += [(x, INSTRUCTION) for x in planted]
        # The rest of the document is ordinary text (the task above it included).
        out += [(x, BENIGN) for x in sentences(p.text.replace(p.planted, "\n")) if x not in planted]
    # Exfiltration through markdown: the sentences that carry the link or the order to
    # build it (the rest of such a message, "Dear user," or "Thank you.", is left out).
    for p in corpora.select(corpora.attacks(["web_injection"]), "dev")[:PER_FAMILY]:
        out += [(x, INSTRUCTION) for x in sentences(p.text) if _EXFIL.search(x)]
    for r in _jsonl(REFERENCE):
        if r["intent"] in ("injection", "extraction", "planted"):
            out.append((r["text"], INSTRUCTION))
        elif r["intent"] == BENIGN:
            out.append((r["text"], BENIGN))
    for p in corpora.select(corpora.attacks(["leakreplay"]), "dev")[:PER_FAMILY]:
        out += [(x, BENIGN) for x in sentences(p.text)]
    out += [(p.text, BENIGN) for p in corpora.benign() if p.split == "dev"]
    out += [(r["text"], BENIGN) for r in _jsonl(ROOT / "tests" / "redteam" / "benign.jsonl")]
    # Markdown documents, headings and lists included: the sentences of this project's
    # docs (not the one that quotes attacks) as they were when the shipped classifier was
    # trained, kept as data so that editing the docs does not change what retraining gives.
    out += [(r["text"], BENIGN) for r in _jsonl(MARKDOWN)]
    out = list(dict.fromkeys(out))
    _refuse_heldout(out)
    return out


_EXFIL = re.compile(r"https?://|\]\(|\]\[|\[[A-Z]{2,}\]|^\s*(print|concatenate|please provide|render|display|show|include|append)\b", re.IGNORECASE)


def digest(pairs: list[tuple[str, str]]) -> str:
    """What a classifier was trained on, as the SHA-256 of its (text, label) pairs."""
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def _refuse_heldout(pairs: list[tuple[str, str]]) -> None:
    heldout = {p.text for p in corpora.benign() if p.split == "heldout"} | {p.text for p in corpora.select(corpora.attacks(), "heldout")}
    leaked = [t for t, _ in pairs if t in heldout]
    if leaked:
        raise ValueError(f"{len(leaked)} held-out prompt(s) in the training data, e.g. {leaked[0][:80]!r}")
