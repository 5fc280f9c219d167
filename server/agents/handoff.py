"""The handoff decision: which agent takes the turn, as a constrained handoff call.

Each agent the current one may hand off to is a tool, `transfer_to_<name>`, described by
the agent's description and example requests (each workflow it may start, in a stored
conversation, is one too: `start_<name>_workflow`); the current agent is a candidate too when
it declares examples (staying is a choice, not only a default). The server's embedding
model ranks the candidates against the user's message, as it ranks tools
(server/toolcalls/shortlist.py):

* the current agent leads: it keeps the turn (`by: "ranking"`);
* one handoff leads clearly and reaches the call threshold: the constraint admits that
  one call only, so it is made without a generation (`by: "ranking"`);
* otherwise the model writes the call under a constraint that admits the best few
  handoffs, or (when the current agent is close, or no handoff reaches the threshold)
  plain text, which keeps the turn (`by: "model"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.agents.config import AgentConfig
from server.engine.base import GenerationParams
from server.telemetry import tracing
from server.telemetry.cost import current_charge
from server.toolcalls.constraint import build_constraint
from server.toolcalls.format import CallParser, with_tools_prompt
from server.toolcalls.shortlist import Shortlister
from server.toolcalls.spec import EMPTY_PARAMETERS, ToolPlan, ToolSpec

# A handoff call is `[{"name": "transfer_to_x", "arguments": {}}]`: a few tokens.
MAX_CALL_TOKENS = 32
_ASK = "Hand the conversation to the specialist agent whose work it is; if it is yours, answer it yourself."


@dataclass
class Handoff:
    """One decision: `to` None when the current agent keeps the turn."""

    agent: str  # who decided
    to: str | None
    by: str  # "ranking" | "model"
    scores: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    mode: str = "transfer"  # "transfer" (the agent answers the user), "consult" (it answers the caller), "workflow"

    def public(self) -> dict[str, Any]:
        return {"from": self.agent, "to": self.to, "by": self.by, "mode": self.mode, "scores": self.scores}


def handoff_tool(agent: AgentConfig) -> ToolSpec:
    return ToolSpec(agent.tool_name, f"Hand the turn to the {agent.name} agent: {agent.description}", EMPTY_PARAMETERS, server=True, asks=tuple(agent.examples))


def workflow_tool(workflow: Any) -> ToolSpec:
    return ToolSpec(workflow.tool_name, f"Start the {workflow.name} workflow: {workflow.description}", EMPTY_PARAMETERS, server=True, asks=tuple(workflow.examples))


class HandoffDecider:
    def __init__(self, agents: dict[str, AgentConfig], shortlister: Shortlister | None, workflows: dict[str, Any] | None = None):
        self.agents = agents
        self.workflows = workflows or {}
        self.shortlister = shortlister

    async def decide(self, current: AgentConfig, candidates: list[str], text: str, engine: Any, request_id: str) -> Handoff:
        """Whether `current` hands the turn (whose latest user message is `text`) to one
        of `candidates` (agents it may hand off to, and workflows as `workflow:<name>`);
        `engine` (the current agent's, metered) writes a call when the ranking leaves it
        open."""
        charge = current_charge.get()
        charged = charge.engine_seconds if charge is not None else 0.0
        with tracing.span(f"agent.handoff {current.name}", enclave__agent=current.name) as span:
            decision = await self._decide(current, candidates, text, engine, request_id)
            if charge is not None:
                decision.engine_seconds = charge.engine_seconds - charged
            tracing.set_attributes(
                span,
                enclave__agent__handoff_to=decision.to or "",
                enclave__agent__decided_by=decision.by,
                gen_ai__usage__input_tokens=decision.prompt_tokens,
                gen_ai__usage__output_tokens=decision.completion_tokens,
            )
        return decision

    async def _decide(self, current: AgentConfig, candidates: list[str], text: str, engine: Any, request_id: str) -> Handoff:
        tools = [workflow_tool(self.workflows[n.removeprefix("workflow:")]) if n.startswith("workflow:") else handoff_tool(self.agents[n]) for n in candidates]
        stay = handoff_tool(current) if current.examples else None
        ranker = self.shortlister
        if ranker is None or ranker.embedder_handle.value is None or not text.strip():
            return await self._generate(current, tools, "auto", text, engine, request_id, {})
        ranked = await ranker.rank(text, tools + ([stay] if stay is not None else []), "")
        scores = {self._target(r.tool.name) or r.tool.name: round(r.score, 3) for r in ranked}
        if stay is not None and ranked[0].tool is stay:
            return Handoff(current.name, None, "ranking", scores)
        offered = ranker.pick(ranked)
        handoffs = [t for t in offered if t is not stay]
        # A call is due when the ranking says so and staying is not as close a choice.
        due = ranker.must_call(ranked) and stay not in offered
        if due and len(handoffs) == 1:
            return Handoff(current.name, self._target(handoffs[0].name), "ranking", scores)
        choice = "required" if due else "auto"
        return await self._generate(current, handoffs, choice, text, engine, request_id, scores)

    async def _generate(self, current: AgentConfig, tools: list[ToolSpec], choice: str, text: str, engine: Any, request_id: str, scores: dict[str, float]) -> Handoff:
        plan = ToolPlan(tools, choice, parallel=False)
        messages = [{"role": "system", "content": f"{current.instructions}\n\n{_ASK}"}, {"role": "user", "content": text}]
        prompt = engine.render_chat(with_tools_prompt(messages, plan, choice))
        constraint = build_constraint([(t.name, t.parameters) for t in tools], allow_text=choice == "auto", parallel=False)
        params = GenerationParams(max_tokens=MAX_CALL_TOKENS, temperature=0.0, regex=constraint.regex)
        parser = CallParser()
        decision = Handoff(current.name, None, "model", scores, prompt_tokens=len(prompt))
        stream = engine.generate(request_id, prompt, params)
        finished = False
        try:
            async for chunk in stream:
                decision.completion_tokens += len(chunk.token_ids)
                parser.feed(chunk.text)
                if chunk.finish_reason is not None:
                    finished = True
                # Text is the current agent keeping the turn: nothing more to read; a
                # call is decided once its name is known.
                if parser.mode == "text" or (parser.calls and parser.calls[0].name):
                    break
        finally:
            if not finished:
                await engine.abort(request_id)
            await stream.aclose()
        if parser.calls and parser.calls[0].name:
            decision.to = self._target(parser.calls[0].name)
        return decision

    def _target(self, tool_name: str) -> str | None:
        """The agent (or `workflow:<name>`) a handoff call names."""
        if tool_name.startswith("start_") and tool_name.endswith("_workflow"):
            name = tool_name.removeprefix("start_").removesuffix("_workflow")
            return f"workflow:{name}" if name in self.workflows else None
        name = tool_name.removeprefix("transfer_to_")
        return name if name in self.agents else None
