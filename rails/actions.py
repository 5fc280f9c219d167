"""Actions behind the Enclave rails (flows.co). Policy values come from config.yml's
`custom_data.enclave`; the server registers one action parameter, `enclave` (a
server.guard.RailServices: the embedder, the engine and caches), at start-up.

Every action returns a NeMo RailOutcome, with a short `reason` that the server records
in the audit log (never the matched text: it may be personal data)."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from typing import Any

from nemoguardrails.actions import action
from nemoguardrails.actions.rail_outcome import RailOutcome, TransformTarget

from server.canary import contains
from server.intents import SENTENCE_BREAK, longest_invisible_run
from server.ownership import OwnershipRule
from server.telemetry.redaction import mask_pii


class _Policy:
    """config.yml's custom_data.enclave, compiled once."""

    def __init__(self, data: dict[str, Any]):
        def compile_all(patterns: list[str]) -> list[re.Pattern]:
            return [re.compile(p, re.IGNORECASE) for p in patterns or []]

        self.pii_kinds = frozenset(data.get("pii_kinds") or [])
        jb = data.get("jailbreak") or {}
        self.jailbreak = compile_all(jb.get("patterns"))
        self.gibberish_share = float(jb.get("gibberish_share", 0.25))
        self.gibberish_min_words = int(jb.get("gibberish_min_words", 10))
        n = int(jb.get("encoded_min_chars", 48))
        self.encoded = re.compile(rf"[A-Za-z0-9+/]{{{n},}}={{0,2}}|\b[0-9a-fA-F]{{{n},}}\b")
        self.hidden_min_chars = int(jb.get("hidden_min_chars", 8))
        topics = data.get("topics") or {}
        self.topic_threshold = float(topics.get("threshold", 0.2))
        # Whole-message small talk ("thanks", "yes, go ahead") that needs no judging;
        # everything else, however short, is judged by similarity.
        talk = [f"(?:{p})" for p in topics.get("small_talk") or []]
        self.small_talk = re.compile("|".join(talk), re.IGNORECASE) if talk else None
        self.topics = list(topics.get("allowed") or [])
        words = [re.escape(str(w)) for w in topics.get("keywords") or []]
        self.topic_keywords = re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE) if words else None
        canary = data.get("canary") or {}
        self.shingle_words = int(canary.get("shingle_words", 10))
        self.content = compile_all((data.get("content_policy") or {}).get("patterns"))
        data_rules = data.get("instructions_in_data") or {}
        self.instructions = compile_all(data_rules.get("patterns"))
        self.replacement = data_rules.get("replacement", "[instruction removed]")
        self.data_threshold = float(data_rules.get("threshold", 0.83))
        self.data_model = data_rules.get("model")
        self.tool_calls = compile_all((data.get("tool_calls") or {}).get("patterns"))
        self.self_check = data.get("self_check") or {}
        # Classifier files are named here and loaded by the server (RailServices).
        intents = data.get("intents") or {}
        self.intent_threshold = float(intents.get("threshold", 0.87))
        self.intents_model = intents.get("model")
        self.ownership = OwnershipRule(data.get("data_owner"))


_POLICIES: dict[int, tuple[Any, _Policy]] = {}


def policy(config: Any) -> _Policy:
    """The compiled policy of a loaded config (kept with it, so the id stays its own)."""
    entry = _POLICIES.get(id(config))
    if entry is None or entry[0] is not config:
        entry = (config, _Policy((config.custom_data or {}).get("enclave") or {}))
        _POLICIES[id(config)] = entry
    return entry[1]


def _target(source: str) -> TransformTarget:
    return TransformTarget.BOT_MESSAGE if source == "output" else TransformTarget.USER_MESSAGE


# ------------------------------------------------------------------ PII


@action(is_system_action=True)
async def enclave_mask_pii(source: str, text: str | None, config: Any = None, **kwargs: Any) -> RailOutcome:
    """Masks emails, card numbers (Luhn), IBANs (mod 97), national IDs, phone numbers
    and street addresses."""
    masked, kinds = mask_pii(text or "", policy(config).pii_kinds)
    if not kinds:
        return RailOutcome.allow()
    return RailOutcome.transform([(_target(source), masked)], reason="masked " + ", ".join(sorted(set(kinds))), metadata={"kinds": kinds})


# ------------------------------------------------------------------ jailbreak

_VOWELS = set("aeiouyAEIOUY")


def _gibberish(word: str) -> bool:
    core = word.strip(".,!?;:'\"()")
    if len(core) < 2:
        return False
    symbols = sum(1 for c in core if not c.isalnum())
    if symbols >= 2 or (symbols and len(core) <= 3):
        return True
    letters = [c for c in core if c.isalpha()]
    if len(letters) >= 4 and not any(c in _VOWELS for c in letters):
        return True
    # Words glued together with a capital in the middle ("similarlyNow"); short brand
    # names ("iPhone", "McDonald") stay below the length.
    flips = sum(1 for a, b in pairwise(core) if a.islower() and b.isupper())
    return flips >= 2 or (flips == 1 and len(core) >= 9)


@action(is_system_action=True)
async def enclave_jailbreak_heuristics(text: str | None, config: Any = None, **kwargs: Any) -> RailOutcome:
    """Persona and "no rules" jailbreak patterns; adversarial-suffix gibberish (what
    NeMo's perplexity heuristics catch, without a second language model); encoded
    payloads."""
    text = text or ""
    pol = policy(config)
    for i, pattern in enumerate(pol.jailbreak):
        if pattern.search(text):
            return RailOutcome.block(reason=f"jailbreak pattern {i}")
    words = text.split()[-20:]
    if len(words) >= pol.gibberish_min_words:
        share = sum(_gibberish(w) for w in words) / len(words)
        if share >= pol.gibberish_share:
            return RailOutcome.block(reason=f"adversarial suffix (gibberish share {share:.2f})")
    if pol.encoded.search(text):
        return RailOutcome.block(reason="encoded payload")
    if longest_invisible_run(text) >= pol.hidden_min_chars:
        return RailOutcome.block(reason="hidden characters")
    return RailOutcome.allow()


# ------------------------------------------------------------------ off topic


@action(is_system_action=True)
async def enclave_off_topic(text: str | None, config: Any = None, enclave: Any = None, context: dict | None = None, **kwargs: Any) -> RailOutcome:
    """Deflects a message far from the deployment's scope (cosine similarity to the
    allowed topics, and to the tools the caller declared, with the server's local
    embedding model)."""
    text = (text or "").strip()
    pol = policy(config)
    if enclave is None or not pol.topics or not text:
        return RailOutcome.allow()
    if pol.small_talk is not None and pol.small_talk.fullmatch(text.rstrip(" .!?,")):
        return RailOutcome.allow(reason="small talk")
    if pol.topic_keywords is not None and pol.topic_keywords.search(text):
        return RailOutcome.allow(reason="support keyword")
    best = await enclave.topic_similarity(text, pol.topics)
    extra = (context or {}).get("extra_topics") or []
    if best < pol.topic_threshold and extra:
        best = max(best, await enclave.topic_similarity(text, list(extra)))
    if best < pol.topic_threshold:
        return RailOutcome.block(reason=f"off topic (similarity {best:.2f} < {pol.topic_threshold})")
    return RailOutcome.allow()


# ------------------------------------------------------------------ harmful intent


@action(is_system_action=True)
async def enclave_harmful_intent(text: str | None, config: Any = None, enclave: Any = None, **kwargs: Any) -> RailOutcome:
    """Judges what the message asks for, however it is worded: the intent classifier
    (server/intents.py) on the local embeddings. Blocks when P(harmful) reaches the
    threshold; the reason names the intent (fraud, intrusion, malware, phishing,
    violence, personal data, extraction, injection, jailbreak…)."""
    pol = policy(config)
    text = (text or "").strip()
    if enclave is None or not pol.intents_model or not text:
        return RailOutcome.allow()
    score = await enclave.intent_score(pol.intents_model, text)
    if score is None or score.p_harmful < pol.intent_threshold:
        return RailOutcome.allow()
    return RailOutcome.block(reason=f"harmful intent: {score.intent} (p={score.p_harmful:.2f} >= {pol.intent_threshold})")


@action(is_system_action=True)
async def enclave_data_owner(text: str | None, config: Any = None, **kwargs: Any) -> RailOutcome:
    """Refuses a request for someone else's records, for records in bulk, or for the
    service's secrets (server/ownership.py), however the request is worded; the user's own
    data and questions about practice pass."""
    finding = policy(config).ownership.finding(text or "")
    if finding is None:
        return RailOutcome.allow()
    return RailOutcome.block(reason=finding.reason())


@action(is_system_action=True)
async def enclave_self_check(text: str | None, config: Any = None, enclave: Any = None, **kwargs: Any) -> RailOutcome:
    """Asks the local model whether the message breaks policy (optional: one model call)."""
    pol = policy(config)
    if enclave is None or not pol.self_check.get("prompt"):
        return RailOutcome.allow()
    answer = await enclave.ask_model(pol.self_check["prompt"].format(text=(text or "")[:2000]), int(pol.self_check.get("max_tokens", 3)))
    if answer.strip().lower().startswith("yes"):
        return RailOutcome.block(reason="self check: model said yes")
    return RailOutcome.allow()


# ------------------------------------------------------------------ output


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


@action(is_system_action=True)
async def enclave_system_prompt_leak(text: str | None, config: Any = None, context: dict | None = None, **kwargs: Any) -> RailOutcome:
    """The canary marker, or a long verbatim run of the system prompt, in the answer."""
    context = context or {}
    seen = (context.get("output_tail") or "") + (text or "")
    canary = context.get("canary") or ""
    if canary and contains(seen, canary):
        return RailOutcome.block(reason="canary in output")
    system = context.get("system_prompt") or ""
    n = policy(config).shingle_words
    if system and n > 0:
        sys_words = _words(system)
        shingles = {tuple(sys_words[i : i + n]) for i in range(len(sys_words) - n + 1)}
        out = _words(seen)
        if any(tuple(out[i : i + n]) in shingles for i in range(len(out) - n + 1)):
            return RailOutcome.block(reason=f"{n} words of the system prompt in output")
    return RailOutcome.allow()


@action(is_system_action=True)
async def enclave_content_policy(text: str | None, config: Any = None, context: dict | None = None, **kwargs: Any) -> RailOutcome:
    seen = ((context or {}).get("output_tail") or "")[-200:] + (text or "")
    for i, pattern in enumerate(policy(config).content):
        if pattern.search(seen):
            return RailOutcome.block(reason=f"content policy pattern {i}")
    return RailOutcome.allow()


# ------------------------------------------------------------------ retrieval and tools

_WORD = re.compile(r"[^\W\d_]{2,}")


async def neutralise(text: str, pol: _Policy, enclave: Any = None) -> tuple[str, int]:
    """The text without the sentences that address the model, and how many there were:
    those the patterns match, and those the data classifier judges to be instructions
    (however they are worded). JSON (a tool result) is neutralised value by value, so it
    stays valid JSON."""
    value: Any = None
    if text.lstrip()[:1] in ("{", "["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
    if not isinstance(value, (dict, list)):
        value = None
    # Every string of the data, split into sentences; judged in one batch.
    strings: list[list[str]] = []

    def collect(v: Any) -> None:
        if isinstance(v, str):
            strings.append(SENTENCE_BREAK.split(v))
        elif isinstance(v, dict):
            for x in v.values():
                collect(x)
        elif isinstance(v, list):
            for x in v:
                collect(x)

    collect(text if value is None else value)
    spots = [(j, i) for j, parts in enumerate(strings) for i in range(0, len(parts), 2) if parts[i].strip()]
    flagged = {(j, i) for j, i in spots if any(p.search(strings[j][i]) for p in pol.instructions)}
    # A sentence of fewer than three words (a heading, a label) carries no instruction worth
    # a model call; the classifier judges the rest.
    rest = [(j, i) for j, i in spots if (j, i) not in flagged and len(_WORD.findall(strings[j][i])) >= 3]
    if rest and enclave is not None and pol.data_model:
        scores = await enclave.instruction_scores(pol.data_model, [strings[j][i] for j, i in rest])
        if scores is not None:
            flagged |= {spot for spot, p in zip(rest, scores, strict=True) if p >= pol.data_threshold}
    if not flagged:
        return text, 0
    for j, i in flagged:
        strings[j][i] = pol.replacement
    joined = iter("".join(parts) for parts in strings)

    def rebuild(v: Any) -> Any:
        if isinstance(v, str):
            return next(joined)
        if isinstance(v, dict):
            return {k: rebuild(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rebuild(x) for x in v]
        return v

    if value is None:
        return next(joined), len(flagged)
    return json.dumps(rebuild(value), ensure_ascii=False), len(flagged)


@action(is_system_action=True)
async def enclave_neutralise_data(text: str | None, config: Any = None, enclave: Any = None, **kwargs: Any) -> RailOutcome:
    """Removes instructions hidden in data (indirect prompt injection) and masks PII."""
    pol = policy(config)
    cleaned, removed = await neutralise(text or "", pol, enclave)
    masked, kinds = mask_pii(cleaned, pol.pii_kinds)
    if not removed and not kinds:
        return RailOutcome.allow()
    reasons = ([f"removed {removed} instruction(s)"] if removed else []) + (["masked " + ", ".join(sorted(set(kinds)))] if kinds else [])
    return RailOutcome.transform([(TransformTarget.USER_MESSAGE, masked)], reason="; ".join(reasons), metadata={"instructions": removed, "kinds": kinds})


@action(is_system_action=True)
async def enclave_check_tool_call(text: str | None, config: Any = None, **kwargs: Any) -> RailOutcome:
    """Refuses tool arguments that carry SQL, shell or prompt injection."""
    for i, pattern in enumerate(policy(config).tool_calls):
        if pattern.search(text or ""):
            return RailOutcome.block(reason=f"tool argument pattern {i}")
    return RailOutcome.allow()
