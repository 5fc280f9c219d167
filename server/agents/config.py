"""Agents declared by a deployment: `deployments/<name>/agents/*.yaml`, one agent a file.

An agent is a named assistant: its instructions, the model it runs on (a profile name,
or a routing tier), the server tools it may use (packs, single tools, MCP servers'
packs `mcp:<label>`), whether it uses the user's episodic memory, the agents it may hand
a turn to, and the example requests it answers (what a handoff to it is ranked by).
Each is served as the model `agent:<name>`; the rails of the deployment check every
turn of every agent (an agent cannot turn them off).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.deployments import load_named
from server.errors import ConfigError

PREFIX = "agent:"
# Names become model ids (`agent:<name>`) and handoff tool names (`transfer_to_<name>`).
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = Field(min_length=1, max_length=300)
    instructions: str = Field(min_length=1)
    # The model it runs on: a model profile's name, or a routing tier; neither: the
    # server's served model.
    model: str | None = None
    tier: str | None = None
    # Server tools: `pack`, `pack.tool`, `tool` or `mcp:<label>` (every entry needs the
    # calling key's scope; tools the key may not use are left out of its turns).
    tools: list[str] = Field(default_factory=list)
    memory: bool = True  # recall and remember the user's episodic memory
    handoffs: list[str] = Field(default_factory=list)
    # Workflows it may hand a turn to (in a stored conversation: a workflow keeps its state there).
    workflows: list[str] = Field(default_factory=list)
    # Requests this agent answers: a handoff to it (or staying with it) is ranked on them.
    examples: list[str] = Field(default_factory=list)
    # Whom its answer goes to when a turn is handed to it: the user (it takes the turn,
    # and holds the conversation), or the agent that handed it (a consultation: that
    # agent answers the user with it). A consulted agent hands nothing on.
    answers: Literal["user", "caller"] = "user"

    @model_validator(mode="after")
    def _valid(self) -> AgentConfig:
        if not NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be 1-40 lowercase letters, digits or _, starting with a letter")
        if self.model is not None and self.tier is not None:
            raise ValueError("give model or tier, not both")
        if self.name in self.handoffs:
            raise ValueError("an agent cannot hand off to itself")
        if len(set(self.handoffs)) != len(self.handoffs):
            raise ValueError("handoffs names an agent twice")
        return self

    @property
    def model_id(self) -> str:
        return PREFIX + self.name

    @property
    def tool_name(self) -> str:
        """The handoff call that hands a turn to this agent."""
        return f"transfer_to_{self.name}"


def load_agents(deployment_dir: Path) -> dict[str, AgentConfig]:
    """The agents of a deployment directory (none without an `agents/` directory);
    ConfigError naming the file for anything wrong."""
    agents = load_named(deployment_dir, "agents", AgentConfig, "agent")
    for agent in agents.values():
        unknown = [h for h in agent.handoffs if h not in agents]
        if unknown:
            raise ConfigError(f"agent {agent.name}: handoffs name unknown agent(s) {', '.join(unknown)} (agents: {', '.join(agents)})")
    return agents
