"""Running a workflow's turn: the run of this conversation (resumed, or started), its
nodes one after the other until one pauses for the user or ends the run, each written to
SQL as it completes and traced as a span.

A turn asked for as `workflow:<name>` is otherwise an ordinary stateful turn: the input
rails check the user's message first (nothing runs until they pass, and a refusal does
not move the run), the output rails check what it says, the turn is stored in the
conversation and settled in the ledger. Its tools go through the executor: scopes, rate
limits, audit and the tool rails, as in the tool loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.auth import Principal
from server.engine.base import GenerationParams
from server.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
)
from server.protocol import ChatCompletionRequest, ResponsesRequest
from server.telemetry import tracing
from server.toolcalls.constraint import TEXT, response_format_regex
from server.toolcalls.executor import Executor, public_action
from server.toolcalls.format import new_call_id
from server.toolcalls.grounding import CATCH_ALL, candidates, has_catch_all, shaped
from server.toolcalls.registry import Tool, ToolContext
from server.turn.events import Kind, TurnEvent
from server.turn.state import Progress, Step, Turn
from server.turn.tool_loop import AFFIRMATIVE
from server.workflows.config import (
    PREFIX,
    BranchNode,
    ConfirmNode,
    ExtractNode,
    HandoffNode,
    RespondNode,
    ToolNode,
    WorkflowConfig,
)
from server.workflows.store import Run, WorkflowStore
from server.workflows.values import argument, lookup, render

# Nodes one turn may run: a workflow whose branches loop stops here instead of for ever.
MAX_NODES = 32
_FILL = "Fill in these fields from what the customer said, as JSON."


@dataclass
class NodeOutcome:
    """What one node did: the node that follows, or the words that pause or end the run."""

    next: str | None = None
    say: str | None = None
    status: str | None = None  # the run's status when the node pauses or ends it


class WorkflowDirector:
    """The deployment's workflows, served as `workflow:<name>`."""

    def __init__(self, workflows: dict[str, WorkflowConfig], store: WorkflowStore, executor: Executor):
        """Resolves every workflow's tools once (the registry is complete by now): an
        unknown tool stops start-up with a message naming the workflow."""
        self.workflows = workflows
        self.store = store
        self.executor = executor
        self.tools = {name: self._tools_of(workflow) for name, workflow in workflows.items()}

    @staticmethod
    def is_workflow(model: str) -> bool:
        return model.startswith(PREFIX)

    def named(self, model: str) -> WorkflowConfig:
        workflow = self.workflows.get(model.removeprefix(PREFIX))
        if workflow is None:
            known = ", ".join(w.model_id for w in self.workflows.values()) or "none on this server"
            raise ModelNotFoundError(f"The model `{model}` does not exist (workflows: {known}).", param="model")
        return workflow

    def _tools_of(self, workflow: WorkflowConfig) -> dict[str, Tool]:
        """The server tools its nodes call, by node."""
        out = {}
        for name, node in workflow.nodes.items():
            ref = node.tool if isinstance(node, (ToolNode, HandoffNode)) else None
            if ref:
                try:
                    found = self.executor.registry.resolve(ref, param="tools")
                except InvalidRequestError as exc:
                    raise ConfigError(f"workflow {workflow.name}: {exc.message}") from None
                if len(found) != 1:
                    raise ConfigError(f"workflow {workflow.name}: node {name} names {ref!r}, which is not one tool")
                out[name] = found[0]
        return out

    def check(self, agents: dict[str, Any]) -> None:
        """At start-up: a destructive tool is reached only through a confirm node's
        on_yes, a handoff names a person or a known agent."""
        for workflow in self.workflows.values():
            for name, tool in self.tools[workflow.name].items():
                if tool.destructive and workflow.confirmed_by(name) is None:
                    raise ConfigError(f"workflow {workflow.name}: node {name} calls {tool.name}, which is destructive: make it the `on_yes` of a confirm node")
            for name, node in workflow.nodes.items():
                if isinstance(node, HandoffNode) and node.to != "human" and node.to not in agents:
                    raise ConfigError(f"workflow {workflow.name}: node {name} hands off to {node.to!r}, which is neither `human` nor an agent")

    def turn(self, model: str, principal: Principal, via: Any = None) -> WorkflowTurn:
        """The workflow a request asks for (or an agent, `via`, handed it), if the key
        may use every tool it calls (403 otherwise)."""
        workflow = self.named(model)
        tools = self.tools[workflow.name]
        for tool in tools.values():
            if not principal.allows(tool.scope):
                raise PermissionDeniedError(
                    f"this API key may not run {workflow.model_id}: it calls the server tool `{tool.name}` (needs scope `{tool.scope}`)",
                    param="model",
                    code="tool_not_permitted",
                )
        return WorkflowTurn(workflow, tools, self.store, self.executor, via)


class WorkflowTurn:
    """A turn asked for as `workflow:<name>`: what it makes of the request (the actor's
    part, as an agent's) and the stage that runs the workflow in place of the model."""

    def __init__(self, workflow: WorkflowConfig, tools: dict[str, Tool], store: WorkflowStore, executor: Executor, via: Any = None):
        self.workflow = workflow
        self.via = via  # the AgentTurn that handed the turn to this workflow, if one did
        self.tools = tools
        self.store = store
        self.executor = executor
        self.run: Run | None = None
        self.path: list[str] = []
        self.resumed = False

    # ------------------------------------------------------------ the actor's part

    def chat_request(self, body: ChatCompletionRequest, model: str) -> ChatCompletionRequest:
        if body.tools:
            raise InvalidRequestError(f"{self.workflow.model_id} calls its own tools; send no `tools`", param="tools")
        return body.model_copy(update={"model": model})

    def responses_request(self, body: ResponsesRequest, model: str) -> ResponsesRequest:
        if body.tools:
            raise InvalidRequestError(f"{self.workflow.model_id} calls its own tools; send no `tools`", param="tools")
        return body.model_copy(update={"model": model})

    def shape_context(self, ctx: Any) -> None:
        ctx.memory = False  # a workflow reads the conversation, not the user's other memories
        ctx.agent = self.workflow.model_id

    def attach(self, turn: Turn) -> None:
        if turn.context is None or turn.context.thread is None or not turn.context.store:
            raise InvalidRequestError(
                f"{self.workflow.model_id} keeps its state in the conversation: send `conversation` (chat completions) or store the response (Responses API)",
                param="conversation",
                code="conversation_required",
            )
        turn.workflow = self
        if self.via is not None:
            self.via.attach(turn)  # the agent's part: its handoffs, and usage split per agent

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workflow": self.workflow.name, "path": self.path, "resumed": self.resumed}
        if self.run is not None:
            out["run"] = self.run.public()
        return out

    # ------------------------------------------------------------ the stage

    async def events(self, turn: Turn, progress: Progress, generation: Any) -> AsyncIterator[TurnEvent]:
        principal = turn.req.principal
        ctx = turn.context
        assert ctx is not None and ctx.thread is not None
        messages = turn.step.messages  # the conversation as the rails passed it
        run = await asyncio.to_thread(self.store.active, principal, ctx.thread.conversation_id, self.workflow.name)
        if run is None:
            run = await asyncio.to_thread(self.store.start, principal, ctx.thread.conversation_id, self.workflow.name, self.workflow.start)
        self.run = run
        self.resumed = not run.new
        new = next((m["content"] for m in reversed(messages) if m["role"] == "user" and m.get("content")), "")
        if new:
            run.said.append(new)
        waiting = run.status == "waiting"
        run.status = "running"
        for _ in range(MAX_NODES):
            name = run.node
            node = self.workflow.nodes[name]
            self.path.append(name)
            started = time.time()
            if isinstance(node, RespondNode) and node.prompt is not None:
                # The one node that streams: the model's answer, over the state.
                async for ev in self._answer(turn, progress, generation, node, run, messages):
                    yield ev
                step = NodeOutcome(status=node.outcome)
            else:
                step = await self._node(turn, progress, generation, name, node, run, messages, resuming=waiting)
            waiting = False
            tracing.record(
                f"workflow.node {name}",
                started,
                time.time(),
                enclave__workflow=self.workflow.name,
                enclave__workflow__run=run.id,
                enclave__workflow__node__kind=node.kind,
                enclave__workflow__next=step.next or "",
                enclave__workflow__status=step.status or "running",
            )
            if step.next is not None:
                run.node = step.next
                await asyncio.to_thread(self.store.save, run)
                continue
            run.status = step.status or "completed"
            await asyncio.to_thread(self.store.save, run)
            if step.say is not None:
                yield TurnEvent(Kind.TEXT, 0, step.say)
            yield TurnEvent.finish(0, "stop")
            return
        run.status = "failed"
        await asyncio.to_thread(self.store.save, run)
        yield TurnEvent(Kind.TEXT, 0, "Sorry, this request went round in circles; a colleague will need to look at it.")
        yield TurnEvent.finish(0, "stop")

    async def _node(self, turn: Turn, progress: Progress, generation: Any, name: str, node: Any, run: Run, messages: list[dict[str, str]], resuming: bool) -> NodeOutcome:
        state = run.state
        if isinstance(node, ExtractNode):
            missing = await self._extract(turn, progress, generation, node, state, messages)
            if missing:
                return NodeOutcome(say=render(node.ask, state), status="waiting")
            return NodeOutcome(next=node.next)
        if isinstance(node, ToolNode):
            return await self._tool(turn, name, node, run, messages)
        if isinstance(node, ConfirmNode):
            return await self._confirm(turn, node, run, messages, resuming)
        if isinstance(node, BranchNode):
            for case in node.when:
                value, present = lookup(state, case.when.field)
                if case.when.holds(value, present):
                    return NodeOutcome(next=case.then)
            return NodeOutcome(next=node.otherwise)
        if isinstance(node, RespondNode):
            return NodeOutcome(say=render(node.template or "", state), status=node.outcome)
        if isinstance(node, HandoffNode):
            return await self._handoff(turn, name, node, run, messages)
        raise AssertionError(f"unknown node kind {node!r}")

    # ------------------------------------------------------------ extract

    async def _extract(self, turn: Turn, progress: Progress, generation: Any, node: ExtractNode, state: dict[str, Any], messages: list[dict[str, str]]) -> list[str]:
        """Fill the node's fields; returns those the user has not given yet. A field whose
        constraint leaves one value (one id written, one reason named) takes it; the model
        chooses among what is left, under its schemas narrowed to what was said."""
        said = "\n".join(self.run.said if self.run is not None else [])
        open_fields: dict[str, dict[str, Any]] = {}
        missing = []
        for f in node.fields:
            schema = self.workflow.state[f]
            found = candidates(schema, said)
            named = [v for v in found if not (isinstance(v, str) and v.lower() in CATCH_ALL)]
            if len(named) == 1:
                state[f] = named[0]
            elif found:
                open_fields[f] = {"enum": found}
            elif shaped(schema) and not has_catch_all(schema):
                missing.append(f)  # an id, a number or a choice the user has not written
            else:
                open_fields[f] = schema  # free text, or a choice with a catch-all: the model's
        if missing or not open_fields:
            return missing
        schema = {"type": "object", "properties": open_fields, "required": list(open_fields)}
        system = "\n\n".join(x for x in (node.instructions, _FILL) if x)
        own = _step_for(turn, generation, [{"role": "system", "content": system}, {"role": "user", "content": said}], 96, response_format_regex(schema))
        text = ""
        try:
            async for chunk in generation.generate(turn, progress, f"{turn.request_id}-extract-{len(self.path)}"):
                text += chunk.text
        finally:
            turn.step = own
        try:
            values = json.loads(text)
        except ValueError:
            return list(open_fields)  # cut short: ask again rather than guess
        state.update({k: v for k, v in values.items() if k in open_fields})
        return []

    # ------------------------------------------------------------ tools

    def _context(self, turn: Turn, messages: list[dict[str, str]]) -> ToolContext:
        p = turn.req.principal
        return ToolContext(p.tenant, p.user, p.key_id, turn.request_id, messages)

    async def _call(self, turn: Turn, tool: Tool, arguments: dict[str, Any], messages: list[dict[str, str]]) -> Any:
        """Run a tool through the executor; its ToolResult is reported with the turn's."""
        results = await self.executor.run([(new_call_id(), tool.name, json.dumps(arguments))], turn.req.principal, self._context(turn, messages))
        result = results[0]
        turn.guards.add(result.guard_events)
        turn.report.server_calls.append(result)
        return result

    async def _tool(self, turn: Turn, name: str, node: ToolNode, run: Run, messages: list[dict[str, str]]) -> NodeOutcome:
        tool = self.tools[name]
        if tool.destructive:
            return await self._run_confirmed(turn, node, run, messages)
        result = await self._call(turn, tool, argument(node.arguments, run.state), messages)
        if result.status != "ok":
            run.state["error"] = _parsed(result.content)
            if node.on_error is None:
                return NodeOutcome(say="Sorry, that could not be done just now; please try again later.", status="failed")
            return NodeOutcome(next=node.on_error)
        if node.output:
            run.state[node.output] = _parsed(result.content)
        return NodeOutcome(next=node.next)

    async def _run_confirmed(self, turn: Turn, node: ToolNode, run: Run, messages: list[dict[str, str]]) -> NodeOutcome:
        """The destructive tool the user just confirmed: its pending action, run once
        (approving it again, or after an operator did, returns the same result)."""
        action_id = run.action_id
        assert action_id is not None, "a destructive tool runs only after its confirm node"
        try:
            row = await self.executor.approve(action_id, turn.req.principal, request_id=turn.request_id, messages=messages)
        except ConflictError:  # it expired, or was cancelled by an operator
            row = await asyncio.to_thread(self.executor.get_action, action_id, turn.req.principal)
        turn.report.pending_action = public_action(row)
        run.action_id = None
        if row["status"] != "succeeded":
            run.state["error"] = {"action": row["status"], "result": _parsed(row.get("result") or "")}
            if node.on_error is None:
                return NodeOutcome(say=f"Nothing was done: the action was {row['status']}.", status="failed")
            return NodeOutcome(next=node.on_error)
        result = row["result"] or ""
        if self.executor.guard is not None:
            result, events = await self.executor.guard.tool_result(result)
            turn.guards.add(events)
        if node.output:
            run.state[node.output] = _parsed(result)
        return NodeOutcome(next=node.next)

    # ------------------------------------------------------------ confirm

    async def _confirm(self, turn: Turn, node: ConfirmNode, run: Run, messages: list[dict[str, str]], resuming: bool) -> NodeOutcome:
        if resuming:
            answer = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            yes = bool(AFFIRMATIVE.match(answer or ""))
            run.state.setdefault("confirmations", []).append({"message": render(node.message, run.state), "answer": "yes" if yes else "no"})
            if yes:
                return NodeOutcome(next=node.on_yes)
            if run.action_id is not None:
                row = await asyncio.to_thread(self.executor.get_action, run.action_id, turn.req.principal)
                if row["status"] == "pending":
                    row = await asyncio.to_thread(self.executor.cancel, run.action_id, turn.req.principal)
                turn.report.pending_action = public_action(row)
                if row["status"] == "succeeded":  # an operator approved it meanwhile: it stands
                    return NodeOutcome(next=node.on_yes)
                run.action_id = None
            return NodeOutcome(next=node.on_no)
        say = render(node.message, run.state)
        target = self.workflow.nodes[node.on_yes]
        tool = self.tools.get(node.on_yes)
        if isinstance(target, ToolNode) and tool is not None and tool.destructive:
            # What the user confirms is this action, with these arguments: it is created
            # now (an operator may approve it too) and runs once on yes.
            result = await self._call(turn, tool, argument(target.arguments, run.state), messages)
            if result.action is None:  # refused before asking (precheck, scope, rate limit)
                run.state["error"] = _parsed(result.content)
                if target.on_error is None:
                    return NodeOutcome(say="Sorry, that cannot be done: " + str(_parsed(result.content)), status="failed")
                return NodeOutcome(next=target.on_error)
            run.action_id = result.action["id"]
            turn.report.pending_action = public_action(result.action)
            say += f" (action {run.action_id})"
        return NodeOutcome(say=say + '\nReply "yes" to go ahead or "no" to cancel.', status="waiting")

    # ------------------------------------------------------------ respond, hand off

    async def _answer(self, turn: Turn, progress: Progress, generation: Any, node: RespondNode, run: Run, messages: list[dict[str, str]]) -> AsyncIterator[TurnEvent]:
        asked = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        system = render(node.prompt or "", run.state) + "\n\nWhat you know: " + json.dumps(run.state, ensure_ascii=False)
        own = _step_for(turn, generation, [{"role": "system", "content": system}, {"role": "user", "content": asked}], turn.step.params.max_tokens, TEXT)
        try:
            async for chunk in generation.generate(turn, progress, f"{turn.request_id}-respond"):
                if chunk.text:
                    yield TurnEvent(Kind.TEXT, 0, chunk.text)
        finally:
            turn.step = own

    async def _handoff(self, turn: Turn, name: str, node: HandoffNode, run: Run, messages: list[dict[str, str]]) -> NodeOutcome:
        if node.tool is not None:
            result = await self._call(turn, self.tools[name], argument(node.arguments, run.state), messages)
            run.state["handoff"] = _parsed(result.content)
            if result.status != "ok":  # never say it was passed on when it was not
                return NodeOutcome(say="Sorry, I could not pass this on to a colleague just now; please try again later.", status="failed")
        if node.to != "human" and turn.context is not None:
            turn.context.agent = node.to  # the agent now holds the conversation
        run.state["handed_to"] = node.to
        return NodeOutcome(say=render(node.message, run.state), status="handed_off")


def _step_for(turn: Turn, generation: Any, messages: list[dict[str, str]], max_tokens: int, regex: str) -> Step:
    """Put a node's own generation step on the turn (what the generation stage reads);
    returns the turn's step, which the node puts back (the output rails and the encoders
    read it)."""
    own = turn.step
    step = Step(messages=messages)
    step.prompt_token_ids = generation.engine.render_chat(messages)
    step.params = GenerationParams(max_tokens=max_tokens, temperature=0.0, regex=regex)
    turn.step = step
    return own


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text

