"""Workflows declared by a deployment: `deployments/<name>/workflows/*.yaml`, one a file.

A workflow is a deterministic path through a structured process: typed state (each
field a JSON schema) and named nodes of six kinds, each naming the node that follows:

* extract  the model fills state fields from what the user said, constrained by their
           schemas (identifiers grounded in the conversation); a field the user has not
           given yet makes the workflow ask (`ask`) and wait on this node;
* tool     a server tool with arguments from state; its result goes to a state field
           (`output`); a failure goes to `on_error` when given;
* confirm  pause for the user's yes or no (`on_yes`, `on_no`); when `on_yes` is a destructive
           tool, that tool's action is created now, as the pending action the user
           confirms, and runs exactly once on yes;
* branch   on state: the first condition that holds (`when`), else `else`;
* respond  a template over state, or a model answer to `prompt` over state; ends the run;
* handoff  to a person (an escalation `tool`) or an agent (who then holds the
           conversation), with a message; ends the run.

Templates write state paths in braces: `{order.item}`. An argument that is exactly one
path keeps the value's type (a number stays a number).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.deployments import load_named

PREFIX = "workflow:"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
PATH = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ExtractNode(_Node):
    kind: Literal["extract"]
    fields: list[str] = Field(min_length=1)
    ask: str  # said when a field is still missing; the run waits on this node
    next: str
    instructions: str = ""  # for the model, beside the fields' schemas


class ToolNode(_Node):
    kind: Literal["tool"]
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    output: str | None = None
    next: str
    on_error: str | None = None


class ConfirmNode(_Node):
    kind: Literal["confirm"]
    message: str
    # Not `yes`/`no`: YAML reads those words as booleans.
    on_yes: str
    on_no: str


class Condition(_Node):
    field: str
    equals: Any = None
    not_equals: Any = None
    exists: bool | None = None

    def holds(self, value: Any, present: bool) -> bool:
        if self.exists is not None:
            return present == self.exists
        if "not_equals" in self.model_fields_set:
            return value != self.not_equals
        return value == self.equals


class Case(_Node):
    when: Condition = Field(alias="if")
    then: str


class BranchNode(_Node):
    kind: Literal["branch"]
    when: list[Case] = Field(min_length=1)
    otherwise: str = Field(alias="else")


class RespondNode(_Node):
    kind: Literal["respond"]
    template: str | None = None
    prompt: str | None = None  # a model answer, over the state
    outcome: str = "completed"  # the run's status once it has answered

    @model_validator(mode="after")
    def _one(self) -> RespondNode:
        if (self.template is None) == (self.prompt is None):
            raise ValueError("a respond node needs a template or a prompt (one of them)")
        return self


class HandoffNode(_Node):
    kind: Literal["handoff"]
    to: str  # "human", or an agent's name
    message: str
    tool: str | None = None  # to a person: the escalation tool that queues the hand-off
    arguments: dict[str, Any] = Field(default_factory=dict)


Node = Annotated[ExtractNode | ToolNode | ConfirmNode | BranchNode | RespondNode | HandoffNode, Field(discriminator="kind")]


class WorkflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = Field(min_length=1, max_length=300)
    state: dict[str, dict[str, Any]] = Field(default_factory=dict)  # field -> JSON schema
    start: str
    nodes: dict[str, Node] = Field(min_length=1)
    examples: list[str] = Field(default_factory=list)  # requests it serves (an agent's handoff to it is ranked on them)

    @model_validator(mode="after")
    def _valid(self) -> WorkflowConfig:
        if not NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be 1-40 lowercase letters, digits or _, starting with a letter")
        if self.start not in self.nodes:
            raise ValueError(f"start {self.start!r} is not a node")
        for name, node in self.nodes.items():
            for target in _targets(node):
                if target not in self.nodes:
                    raise ValueError(f"node {name}: {target!r} is not a node")
            for field in _fields(node):
                if field.split(".")[0] not in self.state:
                    raise ValueError(f"node {name}: {field!r} is not in the state")
        return self

    @property
    def model_id(self) -> str:
        return PREFIX + self.name

    @property
    def tool_name(self) -> str:
        return f"start_{self.name}_workflow"

    def confirmed_by(self, node_name: str) -> str | None:
        """The confirm node whose `yes` is this node, if one is."""
        return next((n for n, node in self.nodes.items() if isinstance(node, ConfirmNode) and node.on_yes == node_name), None)


def _targets(node: Any) -> list[str]:
    if isinstance(node, (ExtractNode, ToolNode)):
        return [node.next] + ([node.on_error] if isinstance(node, ToolNode) and node.on_error else [])
    if isinstance(node, ConfirmNode):
        return [node.on_yes, node.on_no]
    if isinstance(node, BranchNode):
        return [c.then for c in node.when] + [node.otherwise]
    return []


def paths(value: Any) -> list[str]:
    """The state paths a template (or a structure of them) names."""
    if isinstance(value, str):
        return PATH.findall(value)
    if isinstance(value, dict):
        return [p for v in value.values() for p in paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in paths(v)]
    return []


def _fields(node: Any) -> list[str]:
    if isinstance(node, ExtractNode):
        return list(node.fields) + paths(node.ask)
    if isinstance(node, ToolNode):
        return paths(node.arguments) + ([node.output] if node.output else [])
    if isinstance(node, ConfirmNode):
        return paths(node.message)
    if isinstance(node, BranchNode):
        return [c.when.field for c in node.when]
    if isinstance(node, RespondNode):
        return paths(node.template or "") + paths(node.prompt or "")
    if isinstance(node, HandoffNode):
        return paths(node.message) + paths(node.arguments)
    return []


def load_workflows(deployment_dir: Path) -> dict[str, WorkflowConfig]:
    """The workflows of a deployment directory (none without `workflows/`); ConfigError
    naming the file for anything wrong."""
    return load_named(deployment_dir, "workflows", WorkflowConfig, "workflow")
