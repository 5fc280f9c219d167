"""Guardrails: the NeMo Guardrails configuration in rails/, run at each stage of a turn.

`Guard.load` reads the directory once at start-up; a broken file stops start-up with a
message that names it. Each stage has its own list of flows in config.yml (NeMo's
`input`, `output`, `retrieval`, `tool_output` and `tool_input` rails). NeMo's
`check_async` runs input and output rails only, so the retrieval and tool stages run
as the input pass of an LLMRails built from the same directory with that stage's flows:
the chunk or tool text is the message, and the flows are written that way (flows.co).
A stage whose flows are all plain checks runs as a compiled plan of their actions
(server/rail_plan.py) instead of through NeMo's Colang interpreter, with the same result.

A verdict is passed, modified (masked or neutralised) or blocked; every rail that
changed or stopped something becomes a GuardEvent, which the turn reports in its
response, the audit table and the log, with a reason and never the matched text.
Each rail's latency is measured from the activated-rails log (NeMo's, or the plan's
in the same terms) and exported per rail
(`enclave_rail_latency_seconds`, and p50/p95 in `enclave_rail_latency_recent_seconds`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from nemoguardrails.rails.llm.options import RailStatus
from sqlalchemy import delete, insert, select

from server.canary import new_canary
from server.db import guard_events
from server.declines import DeclinePolicy
from server.engine.base import GenerationParams
from server.errors import ConfigError
from server.handles import Late
from server.ids import internal_id
from server.intents import IntentClassifier, IntentScore, normalise, windows
from server.rail_plan import Activated, RailPlan
from server.recent import Recent
from server.telemetry import tracing
from server.telemetry.metrics import Metrics
from server.telemetry.redaction import redact_text

log = logging.getLogger(__name__)

# NeMo's own verdict vocabulary: passed, modified (masked, neutralised, rewritten), blocked.
Status = RailStatus


class Stage(StrEnum):
    """Where in a turn the rails run. The values are the metric labels and audit rows."""

    INPUT = "input"
    OUTPUT = "output"
    RETRIEVAL = "retrieval"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"


@dataclass(frozen=True)
class StageSpec:
    nemo_key: str  # the key of its flows in config.yml
    runs_as: str  # the NeMo rail kind it runs as ("input" or "output")
    hook: str  # where the turn calls it
    on_block: str  # what a block does


# NeMo's names for tools read from the model's side: tool_output is the model's call,
# tool_input its result. The derived stages run as the input pass of their own LLMRails.
STAGES: dict[Stage, StageSpec] = {
    Stage.INPUT: StageSpec("input", "input", "turn.input_gate", "the turn is refused (content_filter); nothing is generated, stored or remembered"),
    Stage.OUTPUT: StageSpec("output", "output", "turn.output_guard (checked windows)", "the choice ends with the refusal (content_filter)"),
    Stage.RETRIEVAL: StageSpec("retrieval", "input", "memory.context (each retrieved chunk)", "the chunk is left out of the context"),
    Stage.TOOL_CALL: StageSpec("tool_output", "input", "toolcalls.executor (before a tool runs)", "the call is not run; the model reads an error result"),
    Stage.TOOL_RESULT: StageSpec("tool_input", "input", "turn.input_gate, toolcalls.executor (before the model reads a result)", "the result is withheld"),
}


@dataclass
class GuardEvent:
    """One rail that masked, neutralised or blocked something."""

    stage: str
    rail: str
    action: str  # "blocked" | "masked" | "neutralised" | "rewritten"
    reason: str = ""

    def public(self) -> dict[str, str]:
        return {"stage": self.stage, "rail": self.rail, "action": self.action, "reason": self.reason}


@dataclass
class Verdict:
    stage: str
    status: Status
    text: str  # the text to use: rewritten, or for a block the refusal
    rail: str | None = None
    reason: str | None = None
    events: list[GuardEvent] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return self.status == Status.BLOCKED


class RailServices:
    """What the actions in rails/actions.py may use from the server (the `enclave`
    action parameter): the local embedding model, the engine, and the classifiers the
    configuration names."""

    def __init__(self, embedder: Late[Any] | None = None, engine: Late[Any] | None = None, classifiers: dict[str, IntentClassifier] | None = None) -> None:
        # Loaded after the rails: handles, filled when the models are (Guard.bind).
        self.embedder_handle = embedder or Late()
        self.engine_handle = engine or Late()
        self.classifiers = classifiers or {}
        self._topic_vectors: dict[tuple[str, ...], np.ndarray] = {}
        # The input rails and the decline stage score a turn's message together.
        self._intent_scores: Recent[tuple[str, tuple[str, ...]], IntentScore] = Recent(256)

    @property
    def embedder(self) -> Any:
        return self.embedder_handle.value

    @property
    def engine(self) -> Any:
        return self.engine_handle.value

    async def topic_similarity(self, text: str, topics: list[str]) -> float:
        if self.embedder is None:  # no model to judge with (an app built without one)
            return 1.0
        vectors = self._topic_vectors.get(tuple(topics))
        if vectors is None:
            vectors = await self.embedder.embed(list(topics))
            if len(self._topic_vectors) >= 256:  # callers' tool lists vary; keep it bounded
                self._topic_vectors.clear()
            self._topic_vectors[tuple(topics)] = vectors
        vec = await self.embedder.embed_one(text)
        return float(np.max(vectors @ vec))

    async def intent_score(self, model: str, text: str) -> IntentScore | None:
        classifier = self.classifiers.get(model)
        if self.embedder is None or classifier is None:
            return None
        parts = windows(text)
        if not parts:  # nothing a reader would see (only invisible or format characters)
            return None

        async def score() -> IntentScore:
            vectors = np.stack([await self.embedder.embed_one(w) for w in parts])
            return classifier.score(vectors, parts)

        return await self._intent_scores.get((model, tuple(parts)), score)

    async def instruction_scores(self, model: str, texts: list[str]) -> np.ndarray | None:
        """P(instruction to the model) of each sentence of some data, in one batch."""
        classifier = self.classifiers.get(model)
        if self.embedder is None or classifier is None:
            return None
        texts = [normalise(t) for t in texts]
        return classifier.harmful(await self.embedder.embed(texts), texts)

    async def ask_model(self, prompt: str, max_tokens: int) -> str:
        if self.engine is None:
            return ""
        ids = self.engine.render_chat([{"role": "user", "content": prompt}])
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
        text = ""
        async for chunk in self.engine.generate(internal_id("guard"), ids, params):
            text += chunk.text
        return text


def _overlay(base: Any, top: Any) -> Any:
    """`top` over `base`: mappings merge key by key, anything else (lists too) is replaced."""
    if isinstance(base, dict) and isinstance(top, dict):
        return {**base, **{k: _overlay(base.get(k), v) for k, v in top.items()}}
    return top


_DEFINE = re.compile(r"^define [^\n]+$", re.MULTILINE)


def _colang_blocks(text: str) -> dict[str, str]:
    """A Colang 1.0 file's top-level `define …` blocks, each up to the next, by its header
    line (what a later directory's block of the same header replaces)."""
    starts = [m.start() for m in _DEFINE.finditer(text)]
    ends = starts[1:] + [len(text)]
    return {text[s:e].split("\n", 1)[0].strip(): text[s:e] for s, e in zip(starts, ends)}


def _read_config(paths: list[Path]) -> Any:
    """The base configuration with each later directory on top (server/deployments.py
    says how); NeMo loads actions.py from every one of them."""
    from nemoguardrails import RailsConfig

    raw: dict[str, Any] = {}
    blocks: dict[str, str] = {}
    for i, path in enumerate(paths):
        config_file = path / "config.yml"
        if not config_file.is_file():
            if i == 0:
                raise ConfigError(f"guardrails: {config_file} not found (ENCLAVE_RAILS_DIR)")
        else:
            try:
                raw = _overlay(raw, yaml.safe_load(config_file.read_text()) or {})
            except yaml.YAMLError as exc:
                raise ConfigError(f"guardrails: {config_file} is not valid YAML: {exc}") from None
        for colang in sorted(path.glob("*.co")):
            blocks.update(_colang_blocks(colang.read_text()))
    config = RailsConfig.from_content(colang_content="\n\n".join(blocks.values()), yaml_content=yaml.safe_dump(raw, sort_keys=False))
    config.config_path = ",".join(str(p) for p in paths)
    return config


def _load_rails(paths: list[Path]) -> tuple[Any, dict[str, Any]]:
    from nemoguardrails import LLMRails

    path = " + ".join(str(p) for p in paths)
    try:
        config = _read_config(paths)
        main = LLMRails(config)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - NeMo raises many types for a bad config; all mean the same
        raise ConfigError(f"guardrails: the configuration in {path} is invalid: {type(exc).__name__}: {exc}") from None
    rails = {Stage.INPUT.value: main, Stage.OUTPUT.value: main}
    # The other stages get an LLMRails of their own, whose input rails are their flows.
    for stage in (s.value for s in Stage if s not in (Stage.INPUT, Stage.OUTPUT)):
        flows = list(getattr(config.rails, STAGES[Stage(stage)].nemo_key).flows)
        if not flows:
            continue
        derived = config.model_copy(deep=True)
        derived.rails.input.flows = flows
        derived.rails.output.flows = []
        try:
            rails[stage] = LLMRails(derived)
        except Exception as exc:  # noqa: BLE001 - as above
            raise ConfigError(f"guardrails: the {STAGES[Stage(stage)].nemo_key} rails in {path} are invalid: {type(exc).__name__}: {exc}") from None
    library = _library_flow_names()
    for r in {id(x): x for x in rails.values()}.values():
        _prune_library_flows(r, library)
    return config, rails


def _load_classifiers(config: Any, paths: list[Path]) -> dict[str, IntentClassifier]:
    """The classifier files the policy names (`model: ….npz` in a section of
    custom_data.enclave), each from the last rails directory that has it: a deployment
    may ship its own. Read at start-up, so a missing or broken one stops it."""
    enclave = (config.custom_data or {}).get("enclave") or {}
    names = {str(v["model"]) for v in enclave.values() if isinstance(v, dict) and str(v.get("model", "")).endswith(".npz")}
    loaded: dict[str, IntentClassifier] = {}
    for name in sorted(names):
        found = next((d / name for d in reversed(paths) if (d / name).is_file()), None)
        if found is None:
            raise ConfigError(f"guardrails: the classifier {name} is in none of {', '.join(map(str, paths))}")
        try:
            loaded[name] = IntentClassifier.load(found)
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"guardrails: the classifier {found} cannot be read: {exc}") from None
    return loaded


def _library_flow_names() -> set[str]:
    import nemoguardrails

    names: set[str] = set()
    for path in (Path(nemoguardrails.__file__).parent / "library").rglob("*.co"):
        names |= set(re.findall(r"^define (?:\w+ )*?(?:sub)?flow ([^\n]+?)\s*$", path.read_text(), re.MULTILINE))
    return names


def _prune_library_flows(rails: Any, library: set[str]) -> None:
    """Drop the NeMo library's flows that this configuration does not use. NeMo loads
    all ~80 of them into every configuration, and its Colang 1.0 runtime steps through
    each flow on each event: unused ones cost about a fifth of every check."""
    used: set[str] = set()
    for key in (spec.nemo_key for spec in STAGES.values()):
        used |= set(getattr(rails.config.rails, key).flows)
    flows = getattr(rails.runtime, "flow_configs", None)
    if isinstance(flows, dict):
        for name in [n for n in flows if n in library and n not in used]:
            del flows[name]


TOOL_RESULT_WITHHELD = '{"error": "the tool\'s result was withheld by the guardrails"}'


class Guard:
    def __init__(
        self,
        paths: Path | list[Path],
        metrics: Metrics,
        canary: str | None = None,
        *,
        audit: GuardAudit | None = None,
        embedder: Late[Any] | None = None,
        engine: Late[Any] | None = None,
        compiled: bool = True,
    ):
        """`paths`: the base rails directory, then the deployment's on top of it.
        `embedder`, `engine`: handles of the models rails may use, filled once loaded.
        `compiled` False: every check through NeMo's runtime (server/rail_plan.py)."""
        self.metrics = metrics
        dirs = [paths] if isinstance(paths, Path) else list(paths)
        self.config, self._rails = _load_rails(dirs)
        # What the rails in force are, file by file: answers kept under other rails
        # (the response cache) are not given under these.
        self.policy_digest = _files_digest(dirs)
        self.services = RailServices(embedder, engine, _load_classifiers(self.config, dirs))
        self.audit = audit
        for r in {id(x): x for x in self._rails.values()}.values():
            r.register_action_param("enclave", self.services)
        # Each stage's flows as a plan of their actions, run without the Colang
        # interpreter; a stage with a flow of another shape stays with NeMo.
        self._plans: dict[str, RailPlan] = {}
        for stage in Stage if compiled else ():
            if self.has(stage.value):
                flows = list(getattr(self.config.rails, STAGES[stage].nemo_key).flows)
                variable = "bot_message" if STAGES[stage].runs_as == "output" else "user_message"
                plan = RailPlan.compile(self._rails[stage.value], flows, variable)
                if plan is not None:
                    self._plans[stage.value] = plan
                else:
                    log.info("guardrails %s: a flow is not a plain check; the stage runs through NeMo's runtime", stage.value)
        # A secret marker in every system prompt: an answer that repeats it is leaking
        # the prompt. New per process, so it cannot be learned from an earlier leak,
        # unless the operator pins it: it is part of every prompt, so runs that must
        # give the same answers across restarts (evals) pin it.
        self.canary = canary or new_canary()
        refusals = self.config.bot_messages.get("refuse to respond") or ["I'm sorry, but I can't help with that request."]
        self.refusal = refusals[0]
        enclave = (self.config.custom_data or {}).get("enclave") or {}
        self._removed_marker = (enclave.get("instructions_in_data") or {}).get("replacement", "[instruction removed]")
        self.declines = DeclinePolicy.from_config(enclave.get("model_declines"))
        self._intents_model = (enclave.get("intents") or {}).get("model")

    async def p_harmful(self, text: str) -> float | None:
        """The harmful-intent classifier's P(harmful) of a message (None: no classifier,
        or nothing a reader would see)."""
        if self._intents_model is None:
            return None
        score = await self.services.intent_score(self._intents_model, text)
        return None if score is None else score.p_harmful

    def bind(self, embedder: Any, engine: Any) -> None:
        self.services.embedder_handle.set(embedder)
        self.services.engine_handle.set(engine)

    def has(self, stage: str) -> bool:
        return stage in self._rails and bool(getattr(self.config.rails, STAGES[Stage(stage)].nemo_key).flows)

    async def warm_up(self) -> None:
        """Run each stage once, so that the first user does not pay for lazy set-up
        (the topic vectors, NeMo's flow compilation)."""
        for stage in STAGES:
            if self.has(stage):
                await self.check(stage, "Hello, where is my order?")

    async def check(self, stage: str, text: str, context: dict[str, Any] | None = None) -> Verdict:
        stage = Stage(stage).value  # a plain string in labels, spans and audit rows
        if not self.has(stage):
            return Verdict(stage, Status.PASSED, text)
        kind = STAGES[Stage(stage)].runs_as
        with tracing.span(f"guardrails {stage}", enclave__guard__stage=stage) as span:
            content, activated = await self._run(stage, kind, text, context)
            events: list[GuardEvent] = []
            blocked: GuardEvent | None = None
            for rail in activated:
                if rail.duration is not None:
                    self.metrics.rail_latency.labels(stage=stage, rail=rail.name).observe(rail.duration)
                    self.metrics.rail_quantiles.observe(stage, rail.name, rail.duration)
                outcome = rail.outcome
                verdict = _verdict(rail, outcome)
                if rail.stop:
                    blocked = GuardEvent(stage, rail.name, "blocked", _reason(rail, outcome))
                    events.append(blocked)
                elif outcome is not None and getattr(outcome, "is_transform", False):
                    found = outcome.metadata or {}
                    action = "neutralised" if found.get("instructions") else "masked" if found.get("kinds") else "rewritten"
                    events.append(GuardEvent(stage, rail.name, action, outcome.reason or ""))
                self.metrics.rail_verdicts.labels(stage=stage, rail=rail.name, verdict=verdict).inc()
                if rail.started_at is not None and rail.finished_at is not None:
                    tracing.record(
                        f"guardrail {rail.name}",
                        rail.started_at,
                        rail.finished_at,
                        enclave__guard__stage=stage,
                        enclave__guard__rail=rail.name,
                        enclave__guard__verdict=verdict,
                        enclave__guard__reason=_reason(rail, outcome) or None,
                    )
            status = Status.BLOCKED if blocked is not None else Status.MODIFIED if content != text else Status.PASSED
            tracing.set_attributes(span, enclave__guard__verdict=status.value, enclave__guard__rail=blocked.rail if blocked else None)
        if blocked is not None:
            return Verdict(stage, Status.BLOCKED, content or self.refusal, blocked.rail, blocked.reason, events)
        if content != text:
            return Verdict(stage, Status.MODIFIED, content, events=events)
        return Verdict(stage, Status.PASSED, text, events=events)

    async def _run(self, stage: str, kind: str, text: str, context: dict[str, Any] | None) -> tuple[str, list[Activated]]:
        """The stage's rails on `text`: the text they leave (or the block's message) and
        each rail that ran. The compiled plan when the stage has one; NeMo otherwise, and
        when an action of the plan fails (NeMo's failure handling then applies)."""
        plan = self._plans.get(stage)
        if plan is not None:
            try:
                done = await plan.run(text, context)
            except Exception:  # any failure: the same check through NeMo
                log.warning("guardrails %s: the compiled plan failed; running the check through NeMo", stage, exc_info=True)
            else:
                return done.text, done.rails
        return await self._nemo(stage, kind, text, context)

    async def _nemo(self, stage: str, kind: str, text: str, context: dict[str, Any] | None) -> tuple[str, list[Activated]]:
        messages: list[dict[str, Any]] = []
        if context:
            messages.append({"role": "context", "content": context})
        if kind == "output":
            messages += [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]
        else:
            messages.append({"role": "user", "content": text})
        res = await self._rails[stage].generate_async(messages=messages, options={"rails": [kind], "log": {"activated_rails": True}})
        content = res.response[-1].get("content", "") if isinstance(res.response, list) and res.response else ""
        activated = [Activated(r.name, _outcome(r), bool(r.stop), r.started_at, r.finished_at, r.duration) for r in (res.log.activated_rails if res.log else [])]
        return content, activated

    async def tool_result(self, content: str) -> tuple[str, list[GuardEvent]]:
        """A tool's result as the model may read it: instructions neutralised, personal
        data masked, or withheld when the rails block it."""
        if not self.has("tool_result"):
            return content, []
        verdict = await self.check("tool_result", content)
        return (TOOL_RESULT_WITHHELD if verdict.blocked else verdict.text), verdict.events

    def nothing_left(self, text: str) -> bool:
        """True when neutralising removed everything but punctuation."""
        return not re.sub(r"\W", "", text.replace(self._removed_marker, ""))

    def output_window(self, system_prompt: str) -> OutputWindow:
        return OutputWindow(self, system_prompt)

    def mark_system_prompt(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages with the canary at the start of the system message (where a
        verbatim leak begins)."""
        if not self.has("output") or not messages or messages[0].get("role") != "system":
            return messages
        first = dict(messages[0])
        first["content"] = f"[{self.canary}] " + (first.get("content") or "")
        return [first, *messages[1:]]


def _outcome(rail: Any) -> Any:
    for act in reversed(rail.executed_actions or []):
        value = act.return_value
        if hasattr(value, "decision"):
            return value
    return None


def _verdict(rail: Any, outcome: Any) -> str:
    """A rail's verdict as a metric label value."""
    if rail.stop:
        return Status.BLOCKED.value
    if outcome is not None and getattr(outcome, "is_transform", False):
        return Status.MODIFIED.value
    return Status.PASSED.value


def _reason(rail: Any, outcome: Any) -> str:
    if outcome is None:
        return ""
    if outcome.reason:
        return outcome.reason
    # NeMo's regex rail names the pattern it matched; record its position, not the text.
    detections = (outcome.metadata or {}).get("detections") or []
    source = (outcome.metadata or {}).get("source")
    if detections and source:
        return f"matched {len(detections)} {source} pattern(s)"
    return ""


# A token that may be the start of personal data still being written.
_SUSPECT = re.compile(r"[\d@]")
_TOKENS = re.compile(r"\S+")
# A word no personal data runs through (server/telemetry/redaction.py): its detectors
# span words of digits, upper-case groups (IBAN), one-letter suffixes (NINO) or
# capitalised street names (ADDRESS), and an email has no spaces. Personal data before
# such a word is complete.
_CLOSES = re.compile(r"[a-z]{2,}[,.;:!?]?")


@dataclass
class _Piece:
    text: str
    logprobs: list | None


class OutputWindow:
    """Streams an answer through the output rails in small windows.

    Text is held until it is checked; nothing unchecked is released. The first window
    is released as soon as the first word is checked (time to first token stays close to
    the unguarded one); later windows every WINDOW_CHARS characters, on word boundaries.
    Words that may be part of personal data still being written (any with a digit or an
    @ among the last HOLD words: card numbers, IBANs, phone numbers and addresses span
    several words) stay held until they are complete, so the PII rail sees them whole:
    until HOLD words follow, or a complete lower-case word does (`_CLOSES`; a numbered
    list's "1." then waits two words, not eight)."""

    WINDOW_CHARS = 96  # about 20 tokens: each window costs one pass of the output rails
    HOLD = 8

    def __init__(self, guard: Guard, system_prompt: str):
        self.guard = guard
        self.context = {"canary": guard.canary, "system_prompt": system_prompt, "output_tail": ""}
        self.pending: list[_Piece] = []
        self.released = ""
        self.verdict: Verdict | None = None  # set when a window is blocked
        self.events: list[GuardEvent] = []

    @property
    def blocked(self) -> bool:
        return self.verdict is not None

    def _text(self) -> str:
        return "".join(p.text for p in self.pending)

    def _release_point(self, text: str, final: bool) -> int:
        if final:
            return len(text)
        words = list(_TOKENS.finditer(text))
        if not words:
            return 0
        p = len(text)
        last = words[-1]
        if last.end() == len(text):  # the last word may still grow
            first_word_only = not self.released and len(words) == 1 and last.group().isalpha()
            if not first_word_only:
                p = last.start()
        closed = max((w.end() for w in words if w.end() < len(text) and _CLOSES.fullmatch(w.group())), default=0)
        for w in words[-self.HOLD :]:
            if closed <= w.start() < p and _SUSPECT.search(w.group()):
                p = w.start()
                break
        return p

    def due(self) -> bool:
        """Whether a window is ready to be checked and released."""
        p = self._release_point(self._text(), final=False)
        return p > 0 and (not self.released or p >= self.WINDOW_CHARS)

    def add(self, text: str, logprobs: list | None) -> None:
        self.pending.append(_Piece(text, logprobs))

    async def release(self, final: bool = False) -> tuple[str, list | None]:
        """Check and release what can be released: (text, logprobs). On a block, the
        window's text is withheld and `verdict` is set."""
        text = self._text()
        p = self._release_point(text, final)
        if p == 0:
            return "", None
        window, rest = text[:p], text[p:]
        # Split the pieces at p (logprobs go with the piece they started in).
        taken, keep, count = [], [], 0
        for piece in self.pending:
            if count + len(piece.text) <= p:
                taken.append(piece)
            else:
                keep.append(piece)
            count += len(piece.text)
        if keep:
            keep = [_Piece(rest, [lp for k in keep for lp in (k.logprobs or [])] or None)]
        self.pending = keep
        verdict = await self.guard.check("output", window, dict(self.context))
        self.events += verdict.events
        if verdict.blocked:
            self.verdict = verdict
            return "", None
        self.released += verdict.text
        self.context["output_tail"] = self.released[-600:]
        logprobs = [lp for t in taken for lp in (t.logprobs or [])] or None
        return verdict.text, logprobs


class GuardAudit:
    """Writes guard events to the `guard_events` table (the audit log of the rails)."""

    def __init__(self, db: Any):
        self.db = db

    @staticmethod
    def forget(conn: Any, tenant: str, user: str) -> dict[str, int]:
        return {"guard_events": conn.execute(delete(guard_events).where(guard_events.c.tenant == tenant, guard_events.c.user == user)).rowcount or 0}

    def fired(self, request_ids: list[str]) -> dict[str, list[dict[str, str]]]:
        """The rails that acted in each of these turns (stage, rail, action), in order."""
        g = guard_events.c
        out: dict[str, list[dict[str, str]]] = {}
        if not request_ids:
            return out
        with self.db.connect() as conn:
            rows = conn.execute(select(g.request_id, g.stage, g.rail, g.action).where(g.request_id.in_(request_ids)).order_by(g.id))
            for r in rows:
                out.setdefault(r.request_id, []).append({"stage": r.stage, "rail": r.rail, "action": r.action})
        return out

    def summary(self, tenant: str, since: float, bucket_s: float) -> list[dict[str, Any]]:
        """Events counted by time bucket, stage, rail and action (one tenant's)."""
        g = guard_events.c
        counts: dict[tuple[float, str, str, str], int] = {}
        query = select(g.at, g.stage, g.rail, g.action).where(g.tenant == tenant, g.at >= since)
        with self.db.connect() as conn:
            for r in conn.execute(query):
                key = (since + ((r.at - since) // bucket_s) * bucket_s, r.stage, r.rail, r.action)
                counts[key] = counts.get(key, 0) + 1
        return [{"bucket_start": k[0], "stage": k[1], "rail": k[2], "action": k[3], "count": n} for k, n in sorted(counts.items())]

    def write(self, request_id: str, tenant: str, user: str, events: list[GuardEvent]) -> None:
        if not events:
            return
        now = time.time()
        rows = [
            {"at": now, "request_id": request_id, "tenant": tenant, "user": user, "stage": e.stage, "rail": e.rail, "action": e.action, "reason": redact_text(e.reason)}
            for e in events
        ]
        with self.db.begin() as conn:
            conn.execute(insert(guard_events), rows)


def _files_digest(dirs: list[Path]) -> str:
    h = hashlib.sha256()
    for i, d in enumerate(dirs):
        for f in sorted(p for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(f"{i}\0{f.relative_to(d).as_posix()}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:32]
