"""Model routing: a model alias (`auto`) sends each turn to a tier by policy.

Tiers are model profiles, declared cheapest first (e.g. small → large). A turn asked for
under the alias goes, in order of precedence, to:

1. the tier an explicit rule names for its key, tenant or user (`key_rule`);
2. the escalation tier when the conversation says so: its previous turn was already
   served there (`escalated_conversation`: an escalation sticks), called an escalation
   tool such as a hand-off to a person (`escalation_tool`) or ran a tool call that failed
   (`failed_tool_call`); or the request carries a failed tool result;
3. the escalation tier when a fast classifier on the user's message, nearest examples
   under the local embedding model, finds it an escalation (`classifier`);
4. the default tier otherwise (`default`).

A tier whose engine is down (every upstream failed its health check) is skipped for the
next in its fallback order, and the reason says so. Conversation signals are read from the
shared database (usage rows and the tool audit), so every replica routes a conversation
the same way. The decision goes into the response (`model`, and the `routing` extension),
its headers and the turn's trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.engine import Engine as Database

from server.auth import Principal
from server.memory.conversations import ConversationStore
from server.telemetry.cost import UsageLedger
from server.toolcalls.audit import ToolAudit

log = logging.getLogger(__name__)

# Tool-audit outcomes that count as a failed tool call.
FAILED_TOOL = ("error", "timeout")

class KeyRule(BaseModel):
    """Turns of a key, tenant or user (every field given must match) go to `tier`."""

    model_config = ConfigDict(extra="forbid")

    key_id: str | None = None
    tenant: str | None = None
    user: str | None = None
    tier: str

    @model_validator(mode="after")
    def _matches_something(self) -> KeyRule:
        if self.key_id is None and self.tenant is None and self.user is None:
            raise ValueError("a key rule needs key_id, tenant or user")
        return self

    def matches(self, principal: Principal) -> bool:
        return all(
            want is None or want == have
            for want, have in ((self.key_id, principal.key_id), (self.tenant, principal.tenant), (self.user, principal.user))
        )


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Examples of each side; unset: the deployment's `routing_examples` (with_examples).
    escalation: list[str] | None = Field(None, min_length=1)
    routine: list[str] | None = Field(None, min_length=1)
    # Each side scores the mean similarity of its `k` nearest examples; the message
    # escalates when the escalation side wins by at least `margin`.
    k: int = Field(3, ge=1)
    margin: float = Field(0.02, ge=-1, le=1)


class RoutingConfig(BaseModel):
    """`routing:` in the settings file (or ENCLAVE_ROUTING as JSON)."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field("auto", min_length=1)
    # Tier name → model profile, cheapest first.
    tiers: dict[str, str] = Field(min_length=1)
    # Default: the first tier. Escalations: the last.
    default_tier: str | None = None
    escalation_tier: str | None = None
    # Tier → the tiers tried in order when it is down; default: the others, nearest first.
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    key_rules: list[KeyRule] = Field(default_factory=list)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    # Conversation signals.
    escalate_on_failed_tool_call: bool = True
    sticky_escalation: bool = True
    # Tools whose call is itself an escalation (the support pack's hand-off to a person).
    escalation_tools: list[str] = Field(default_factory=lambda: ["handoff_to_agent"])

    @model_validator(mode="after")
    def _known_tiers(self) -> RoutingConfig:
        names = list(self.tiers)
        self.default_tier = self.default_tier or names[0]
        self.escalation_tier = self.escalation_tier or names[-1]
        named = [self.default_tier, self.escalation_tier, *self.fallbacks, *(t for f in self.fallbacks.values() for t in f), *(r.tier for r in self.key_rules)]
        unknown = sorted({t for t in named if t not in self.tiers})
        if unknown:
            raise ValueError(f"unknown tier(s) {', '.join(unknown)}; tiers are {', '.join(names)}")
        return self

    def fallback_order(self, tier: str) -> list[str]:
        if tier in self.fallbacks:
            return self.fallbacks[tier]
        names = list(self.tiers)
        at = names.index(tier)
        return sorted((n for n in names if n != tier), key=lambda n: (abs(names.index(n) - at), names.index(n)))


class Serving(Protocol):
    """What the router needs of a tier's serving: its model and whether it can serve."""

    model: str

    def available(self) -> bool: ...


@dataclass
class Decision:
    alias: str
    tier: str
    model: str
    reason: str
    fallback_from: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alias": self.alias, "tier": self.tier, "model": self.model, "reason": self.reason}
        if self.fallback_from is not None:
            out["fallback_from"] = self.fallback_from
        if self.scores:
            out["scores"] = self.scores
        return out

    def headers(self) -> dict[str, str]:
        return {"x-enclave-model": self.model, "x-enclave-route": self.reason}

    def trace_attributes(self) -> dict[str, Any]:
        return {
            "enclave__route__alias": self.alias,
            "enclave__route__tier": self.tier,
            "enclave__route__model": self.model,
            "enclave__route__reason": self.reason,
            "enclave__route__fallback_from": self.fallback_from,
        }


@dataclass
class RouteRequest:
    """What a turn tells the router: the latest user text and where it continues from."""

    text: str
    conversation: str | None = None  # the client's conversation name
    previous_response_id: str | None = None
    failed_tool_result: bool = False
    stored: bool = False  # the turn is stored in a conversation (what a workflow needs)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def has_failed_tool_result(messages: list[dict[str, Any]]) -> bool:
    """A tool result in the request that reports an error (`{"error": …}` or `error: …`)."""
    for message in messages:
        if message.get("role") != "tool":
            continue
        text = _text(message.get("content")).strip()
        if text.lower().startswith("error"):
            return True
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get("error"):
            return True
    return False


def with_examples(config: RoutingConfig, examples: Any) -> RoutingConfig:
    """`config` with the classifier examples it leaves unset taken from the deployment's
    (a RoutingExamples); ValueError when neither has them."""
    classifier = config.classifier
    if not classifier.enabled or (classifier.escalation and classifier.routine):
        return config
    if examples is None:
        raise ValueError("routing.classifier needs escalation and routine examples: the deployment has no routing_examples")
    update = {"escalation": classifier.escalation or list(examples.escalation), "routine": classifier.routine or list(examples.routine)}
    return config.model_copy(update={"classifier": classifier.model_copy(update=update)})


class EscalationClassifier:
    """Nearest examples under the embedding model: a few milliseconds on a CPU."""

    def __init__(self, config: ClassifierConfig, embedder: Any):
        self.config = config
        self.embedder = embedder
        self._examples: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = asyncio.Lock()

    async def _example_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        async with self._lock:
            if self._examples is None:
                vectors = await self.embedder.embed([*self.config.escalation, *self.config.routine])
                n = len(self.config.escalation)
                self._examples = (vectors[:n], vectors[n:])
        return self._examples

    async def scores(self, text: str) -> tuple[float, float]:
        escalation, routine = await self._example_vectors()
        message = await self.embedder.embed_one(text)  # the topic rail reuses it

        def side(examples: np.ndarray) -> float:
            sims = np.sort(examples @ message)[::-1][: self.config.k]
            return float(sims.mean())

        return side(escalation), side(routine)


@dataclass
class ConversationSignals:
    """The stores the router reads a conversation's last turn from."""

    conversations: ConversationStore
    usage: UsageLedger
    tool_audit: ToolAudit


class ModelRouter:
    def __init__(self, config: RoutingConfig, servings: dict[str, Serving], embedder: Any, db: Database | None):
        missing = sorted(m for m in config.tiers.values() if m not in servings)
        if missing:
            raise ValueError(f"routing names models that are not loaded: {', '.join(missing)}")
        self.config = config
        self.servings = servings
        self.signals = ConversationSignals(ConversationStore(db), UsageLedger(db), ToolAudit(db)) if db is not None else None
        self.classifier = EscalationClassifier(config.classifier, embedder) if config.classifier.enabled and embedder is not None else None

    @property
    def alias(self) -> str:
        return self.config.alias

    def serving(self, tier: str) -> Serving:
        return self.servings[self.config.tiers[tier]]

    async def route(self, principal: Principal, request: RouteRequest) -> tuple[Serving, Decision]:
        tier, reason, scores = await self._choose(principal, request)
        chosen, fallback_from = tier, None
        if not self.serving(tier).available():
            for other in self.config.fallback_order(tier):
                if self.serving(other).available():
                    chosen, fallback_from = other, tier
                    reason = f"{reason}; fallback: {tier} unavailable"
                    break
        decision = Decision(self.alias, chosen, self.config.tiers[chosen], reason, fallback_from, scores)
        return self.serving(chosen), decision

    async def _choose(self, principal: Principal, request: RouteRequest) -> tuple[str, str, dict[str, float]]:
        config = self.config
        for rule in config.key_rules:
            if rule.matches(principal):
                return rule.tier, "key_rule", {}
        escalate = config.escalation_tier
        assert escalate is not None and config.default_tier is not None
        if config.escalate_on_failed_tool_call and request.failed_tool_result:
            return escalate, "failed_tool_call", {}
        if request.conversation or request.previous_response_id:
            signal = await asyncio.to_thread(self._conversation_signal, principal, request)
            if signal is not None:
                return escalate, signal, {}
        if self.classifier is not None and request.text.strip():
            up, routine = await self.classifier.scores(request.text)
            scores = {"escalation": round(up, 4), "routine": round(routine, 4)}
            if up - routine >= config.classifier.margin:
                return escalate, "classifier", scores
            return config.default_tier, "default", scores
        return config.default_tier, "default", {}

    def _conversation_signal(self, principal: Principal, request: RouteRequest) -> str | None:
        """What the conversation's previous turn says: it was escalated, it called an
        escalation tool, or one of its tool calls failed (each read from the store that
        owns it: the conversation, its usage, its tool calls)."""
        if self.signals is None:
            return None
        conversation_id = self.signals.conversations.conversation_id(principal, request.previous_response_id, request.conversation)
        last = self.signals.usage.last_turn(conversation_id) if conversation_id is not None else None
        if last is None:
            return None
        request_id, model = last
        escalated_model = self.config.tiers[self.config.escalation_tier or ""]
        if self.config.sticky_escalation and model == escalated_model and self.config.default_tier != self.config.escalation_tier:
            return "escalated_conversation"
        calls = self.signals.tool_audit.calls_of(request_id)
        if any(tool in self.config.escalation_tools for tool, _ in calls):
            return "escalation_tool"
        if self.config.escalate_on_failed_tool_call and any(status in FAILED_TOOL for _, status in calls):
            return "failed_tool_call"
        return None
