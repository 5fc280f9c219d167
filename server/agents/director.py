"""The agent stage: which agent runs a turn asked for as `agent:<name>`, and on what.

Before the turn is prepared (its ledger is open, so every model call here is charged
to it), the director:

1. starts with the agent that holds the conversation, when the asked agent can reach it
   through handoffs (a conversation handed to billing stays with billing), else with
   the asked agent;
2. lets the current agent hand the turn on (server/agents/handoff.py), at most
   MAX_HANDOFFS times, each time among agents no decision of the turn has weighed yet
   (so never back to one it left); a handoff to an agent that `answers: caller` is a
   consultation instead (server/agents/consult.py): its answer goes back to the current
   agent, which keeps the turn; a handoff to a workflow gives it the turn;
3. gives the API the chosen agent: its model's serving, its instructions ahead of the
   client's, its server tools (those the key's scopes allow) beside the client's, and
   whether it uses episodic memory.

The turn then runs as any other; the response's `agent` extension, the trace's spans
and the per-agent usage rows (server/telemetry/cost.py) say who did what.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from server.agents.config import PREFIX, AgentConfig
from server.agents.consult import Consultation, consult
from server.agents.handoff import Handoff, HandoffDecider
from server.auth import Principal
from server.errors import ConfigError, InvalidRequestError, ModelNotFoundError
from server.ids import internal_id
from server.memory.conversations import ConversationStore
from server.protocol import ChatCompletionRequest, ChatMessage, ResponsesRequest
from server.routing import RouteRequest

MAX_HANDOFFS = 3


@dataclass
class AgentTurn:
    """The agent a turn runs as, and how it came to run it."""

    asked: str
    agent: AgentConfig
    held: bool  # began with the agent (or the workflow) holding the conversation
    handoffs: list[Handoff] = field(default_factory=list)
    # The workflow the turn was handed to (its name), which then runs it in the agent's place.
    workflow: str | None = None
    tools: list[str] = field(default_factory=list)  # the server tools it brings to this turn
    withheld: list[str] = field(default_factory=list)  # its tools the key's scopes leave out
    usage: list[dict[str, Any]] | None = None  # per agent, once the turn is settled
    consulted: list[Consultation] = field(default_factory=list)  # specialists whose answers it reads

    def _server_entries(self, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """The request's tools plus this agent's (a tool the client named itself is kept as the client gave it)."""
        named = {t.get("name") for t in tools or [] if isinstance(t, dict) and t.get("type") == "server"}
        named |= {(t.get("function") or {}).get("name") for t in tools or [] if isinstance(t, dict) and t.get("type") == "function"}
        named |= {t.get("name") for t in tools or [] if isinstance(t, dict) and t.get("type") == "function"}  # the Responses API's flat form
        extra = [{"type": "server", "name": name} for name in self.tools if name not in named]
        return [*(tools or []), *extra] or None

    def chat_request(self, body: ChatCompletionRequest, model: str) -> ChatCompletionRequest:
        messages = [ChatMessage(role="system", content=self.agent.instructions), *body.messages]
        for c in self.consulted:  # what a specialist answered, as the result of asking it
            call = {"id": c.call_id, "type": "function", "function": {"name": c.tool_name, "arguments": c.arguments}}
            messages += [ChatMessage(role="assistant", tool_calls=[call]), ChatMessage(role="tool", tool_call_id=c.call_id, content=c.answer)]
        return body.model_copy(update={"model": model, "messages": messages, "tools": self._server_entries(body.tools)})

    def responses_request(self, body: ResponsesRequest, model: str) -> ResponsesRequest:
        instructions = "\n\n".join(x for x in (self.agent.instructions, body.instructions or "") if x)
        update: dict[str, Any] = {"model": model, "instructions": instructions, "tools": self._server_entries(body.tools)}
        if self.consulted:
            items = [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) else list(body.input)
            for c in self.consulted:
                items += [
                    {"type": "function_call", "call_id": c.call_id, "name": c.tool_name, "arguments": c.arguments},
                    {"type": "function_call_output", "call_id": c.call_id, "output": c.answer},
                ]
            update["input"] = items
        return body.model_copy(update=update)

    @property
    def answered_by(self) -> str:
        return f"workflow:{self.workflow}" if self.workflow is not None else self.agent.name

    def attach(self, turn: Any) -> None:
        turn.report.agent = self

    def shape_context(self, ctx: Any) -> None:
        """A stateful turn's context: stored as this agent's, with episodic memory only
        when the agent uses it."""
        ctx.agent = self.agent.name
        ctx.memory = ctx.memory and self.agent.memory

    def segments(self, prompt_tokens: int, completion_tokens: int, engine_seconds: float) -> list[dict[str, Any]]:
        """Usage per agent: each decision's to the agent that made it, the rest (the
        turn itself) to the agent that answered. Totals are the turn's."""
        rows: dict[str, dict[str, Any]] = {}

        def add(agent: str, p: int, c: int, s: float) -> None:
            row = rows.setdefault(agent, {"agent": agent, "prompt_tokens": 0, "completion_tokens": 0, "engine_seconds": 0.0})
            row["prompt_tokens"] += p
            row["completion_tokens"] += c
            row["engine_seconds"] += s

        decided = 0.0
        for h in self.handoffs:
            add(h.agent, h.prompt_tokens, h.completion_tokens, h.engine_seconds)
            decided += h.engine_seconds
        for c in self.consulted:
            add(c.agent, c.prompt_tokens, c.completion_tokens, c.engine_seconds)
            decided += c.engine_seconds
        add(self.answered_by, prompt_tokens, completion_tokens, max(engine_seconds - decided, 0.0))
        return list(rows.values())

    @property
    def decision_tokens(self) -> tuple[int, int]:
        """Tokens of the model calls before the turn's own: handoff decisions, consultations."""
        parts = [*self.handoffs, *self.consulted]
        return sum(p.prompt_tokens for p in parts), sum(p.completion_tokens for p in parts)

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "asked": self.asked,
            "agent": self.agent.name,
            "held": self.held,
            "workflow": self.workflow,
            "handoffs": [h.public() for h in self.handoffs],
            "tools": self.tools,
        }
        if self.withheld:
            out["tools_withheld"] = self.withheld
        if self.consulted:
            out["consulted"] = [c.public() for c in self.consulted]
        if self.usage is not None:
            out["usage"] = self.usage
        return out


class AgentDirector:
    def __init__(self, agents: dict[str, AgentConfig], decider: HandoffDecider, registry: Any, conversations: ConversationStore | None, workflows: Any = None):
        """`workflows`: the WorkflowDirector, when the deployment has workflows."""
        self.agents = agents
        self.decider = decider
        self.registry = registry
        self.conversations = conversations
        self.workflows = workflows

    @staticmethod
    def is_agent(model: str) -> bool:
        return model.startswith(PREFIX)

    def named(self, model: str) -> AgentConfig:
        agent = self.agents.get(model.removeprefix(PREFIX))
        if agent is None:
            known = ", ".join(a.model_id for a in self.agents.values()) or "none on this server"
            raise ModelNotFoundError(f"The model `{model}` does not exist (agents: {known}).", param="model")
        return agent

    def check_tools(self) -> None:
        """Every agent's tools resolve to enabled server tools (at start-up)."""
        if not any(a.tools for a in self.agents.values()):
            return
        for agent in self.agents.values():
            for ref in agent.tools:
                if self.registry is None:
                    raise ConfigError(f"agent {agent.name}: tools need server tools, which are not enabled")
                try:
                    tools = self.registry.resolve(ref, param="tools")
                except InvalidRequestError:
                    raise ConfigError(f"agent {agent.name}: no enabled server tool or pack is named {ref!r} (enable its pack in tool_packs or its MCP server)") from None
                destructive = [t.name for t in tools if t.destructive]
                if agent.answers == "caller" and destructive:
                    # Its answer is read by another agent: nobody would be asked to confirm.
                    raise ConfigError(f"agent {agent.name} answers its caller, so it may not use destructive tools ({', '.join(destructive)})")

    def _tools(self, agent: AgentConfig, principal: Principal) -> tuple[list[str], list[str]]:
        allowed: list[str] = []
        withheld: list[str] = []
        for ref in agent.tools:
            for tool in self.registry.resolve(ref, param="tools"):
                target = allowed if principal.allows(tool.scope) else withheld
                if tool.name not in target:
                    target.append(tool.name)
        return allowed, withheld

    def _reachable(self, start: AgentConfig) -> set[str]:
        seen = {start.name}
        todo = [start]
        while todo:
            for name in todo.pop().handoffs:
                if name not in seen:
                    seen.add(name)
                    todo.append(self.agents[name])
        return seen

    def check_workflows(self) -> None:
        """Every workflow an agent names exists (at start-up)."""
        known = self.workflows.workflows if self.workflows is not None else {}
        for agent in self.agents.values():
            unknown = [w for w in agent.workflows if w not in known]
            if unknown:
                raise ConfigError(f"agent {agent.name}: workflows name unknown workflow(s) {', '.join(unknown)} (workflows: {', '.join(known) or 'none'})")

    async def holder(self, principal: Principal, route: RouteRequest) -> tuple[str | None, str | None]:
        if self.conversations is None or not (route.conversation or route.previous_response_id):
            return None, None
        return await asyncio.to_thread(self.conversations.holder, principal, route.conversation, route.previous_response_id)

    def _reaches_workflow(self, start: AgentConfig, name: str) -> bool:
        return any(name in self.agents[a].workflows for a in self._reachable(start))

    async def _held_workflow(self, principal: Principal, holder: str | None, conversation_id: str | None, asked: AgentConfig) -> str | None:
        """The workflow holding the conversation, while its run waits for the user."""
        if holder is None or not holder.startswith("workflow:") or conversation_id is None or self.workflows is None:
            return None
        name = holder.removeprefix("workflow:")
        if not self._reaches_workflow(asked, name):
            return None
        run = await asyncio.to_thread(self.workflows.store.active, principal, conversation_id, name)
        return name if run is not None else None

    async def direct(self, principal: Principal, asked: AgentConfig, route: RouteRequest, serving_of: Any) -> AgentTurn:
        """The agent that runs this turn (or the workflow it hands it to). `serving_of(agent)`:
        the serving an agent's handoff call and consultation run on."""
        holder, conversation_id = await self.holder(principal, route)
        waiting = await self._held_workflow(principal, holder, conversation_id, asked)
        if waiting is not None:  # a workflow paused for the user goes on with their answer
            return AgentTurn(asked.name, asked, True, workflow=waiting)
        held = holder is not None and holder != asked.name and holder in self.agents and holder in self._reachable(asked)
        current = self.agents[holder] if held and holder is not None else asked
        handoffs: list[Handoff] = []
        consulted: list[Consultation] = []
        # An agent decides among the agents no decision of this turn has weighed yet: one
        # that was just handed the turn does not weigh again what its sender weighed.
        weighed = {current.name}
        while len(handoffs) < MAX_HANDOFFS:
            candidates = [name for name in current.handoffs if name not in weighed]
            if route.stored:  # a workflow keeps its state in the conversation
                candidates += [f"workflow:{w}" for w in current.workflows if f"workflow:{w}" not in weighed]
            if not candidates:
                break
            weighed.update(candidates)
            decision = await self.decider.decide(current, candidates, route.text, serving_of(current).engine, internal_id("handoff"))
            handoffs.append(decision)
            if decision.to is None:
                break
            if decision.to.startswith("workflow:"):
                decision.mode = "workflow"
                return AgentTurn(asked.name, current, held, handoffs, workflow=decision.to.removeprefix("workflow:"))
            target = self.agents[decision.to]
            if target.answers == "caller":
                decision.mode = "consult"
                tools = self._tools(target, principal)[0] if self.registry is not None and target.tools else []
                consulted = [await consult(serving_of(target), target, tools, principal, route.text)]
                break
            current = target
        turn = AgentTurn(asked.name, current, held, handoffs, consulted=consulted)
        if self.registry is not None and current.tools:
            turn.tools, turn.withheld = self._tools(current, principal)
        return turn
