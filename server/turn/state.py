"""A turn's state: what was asked (immutable) and what the stages have made of it.

`TurnRequest` is fixed once the turn is planned. `Turn` holds the mutable parts, each
owned by one stage: the step to generate (prompt stage), the report beside the answer
(tool loop, input gate), the guard ledger (every guard stage) and the turn ledger
(admission, tracing, settling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from server.auth import Principal
from server.engine.base import GenerationParams
from server.memory.context import ContextRequest
from server.protocol import ChatCompletionRequest
from server.toolcalls.spec import ToolPlan, ToolSpec

if TYPE_CHECKING:
    from server.agents.director import AgentTurn
    from server.guard import Verdict
    from server.routing import Decision
    from server.toolcalls.executor import ToolResult
    from server.turn.guard_ledger import GuardLedger
    from server.turn.input_gate import PendingGate
    from server.turn.ledger import TurnLedger
    from server.workflows.runner import WorkflowTurn


@dataclass(frozen=True)
class TurnRequest:
    request_id: str
    request: ChatCompletionRequest
    principal: Principal
    plan: ToolPlan | None
    started: float  # perf_counter at arrival, for latency metrics
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Step:
    """The next generation: its messages, rendered under a tool choice."""

    messages: list[dict[str, str]] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    params: GenerationParams = field(default_factory=lambda: GenerationParams(max_tokens=1))
    tool_choice: str = "none"  # of this step (the plan's, then the loop's)
    # The parameters each tool's calls are held to in this step (grounded and sized), by
    # name: what a call cut by max_tokens is closed against (server/toolcalls/closing.py).
    call_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Report:
    """What the turn reports beside its answer (the response's extension fields)."""

    server_calls: list[ToolResult] = field(default_factory=list)
    pending_action: dict[str, Any] | None = None
    refusal: Verdict | None = None  # the input rails' verdict when they refused
    route: Decision | None = None  # where the router sent a turn asked for by alias
    cache: dict[str, Any] | None = None  # the response cache's part (cache_stage.py)
    shortlist: dict[str, Any] | None = None  # the tools ranked and offered (tool choice stage)
    source_answer: dict[str, Any] | None = None  # the evidence ranked and chosen (source answer stage)
    agent: AgentTurn | None = None  # the agent that runs a turn asked for as `agent:<name>` (server/agents)


@dataclass
class Turn:
    req: TurnRequest
    guards: GuardLedger
    step: Step = field(default_factory=Step)
    report: Report = field(default_factory=Report)
    context: ContextRequest | None = None  # a stateful turn's
    ledger: TurnLedger | None = None  # set by the dispatcher once admitted
    gate: PendingGate | None = None  # input rails still deciding while generation starts
    # The tools offered to the model under `auto`/`required` when the server shortlisted
    # them; None: the plan's own.
    offered: list[ToolSpec] | None = None
    # The first step's tool choice when the shortlist decided it ("required": an `auto`
    # request that clearly asks for a tool); None: the plan's own.
    first_choice: str | None = None
    # Engine request ids of a turn restarted by its input rails get a new suffix: the
    # dropped generation's abort must never reach the one that replaces it.
    attempt: int = 0
    # A turn asked for as `workflow:<name>`: its nodes run in place of the model's answer.
    workflow: WorkflowTurn | None = None
    # Builds the stored API object (the Responses API's) from the finished answer.
    stored_as: Callable[[Any, Any], tuple[Any, Any]] | None = None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def engine_request_id(self) -> str:
        return self.req.request_id if self.attempt == 0 else f"{self.req.request_id}-r{self.attempt}"


@dataclass
class Progress:
    """What the turn's generations have produced so far, for usage and metrics."""

    completion_tokens: int = 0
    prompt_tokens: int = 0
    first_token_at: float | None = None
    # Set by a stage while it stops a generation it no longer wants (the input rails
    # refused or rewrote its input, the decline stage replaces it): the abort is counted
    # as "superseded", not as the client leaving.
    superseding: bool = False
    # Tokens of model calls made for the turn before its generations (an agent's handoff
    # decisions): billed with it, and kept by a reset.
    earlier_prompt_tokens: int = 0
    earlier_completion_tokens: int = 0

    @property
    def billed(self) -> tuple[int, int]:
        """(prompt, completion) tokens the turn is billed and reports."""
        return self.prompt_tokens + self.earlier_prompt_tokens, self.completion_tokens + self.earlier_completion_tokens

    def reset(self) -> None:
        self.completion_tokens = self.prompt_tokens = 0
        self.first_token_at = None
