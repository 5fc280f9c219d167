"""The model registry: every name the server answers to, and what serves it.

Chat models go by their profile's name and aliases, each served by one ChatServing; the
routing alias (`auto`) stands for the router's tiers; the embedding model has its own
name. /v1/models lists what is here, and a turn's model name is resolved here.
"""

from __future__ import annotations

from server.agents.config import AgentConfig
from server.protocol import ModelCard
from server.routing import ModelRouter
from server.turn.pipeline import ChatServing
from server.workflows.config import WorkflowConfig


class ModelRegistry:
    def __init__(self, embedding_name: str, created: int):
        self.embedding_name = embedding_name
        self.created = created
        self.servings: dict[str, ChatServing] = {}  # by profile name, once loaded
        self.router: ModelRouter | None = None  # when routing is configured
        # Before loading: what the served profile says (name, aliases, window).
        self.expected: tuple[list[str], int | None] = ([], None)
        self.agents: dict[str, AgentConfig] = {}  # the deployment's, served as `agent:<name>`
        self.workflows: dict[str, WorkflowConfig] = {}  # and as `workflow:<name>`

    def add(self, serving: ChatServing) -> None:
        self.servings[serving.model] = serving

    def serving_for(self, name: str) -> ChatServing | None:
        for serving in self.servings.values():
            if name in serving.served_names:
                return serving
        return None

    def cards(self) -> list[ModelCard]:
        names, window = self.expected
        if not self.servings:  # still loading: what the profile says
            cards = [ModelCard(id=name, created=self.created, root=names[0], max_model_len=window) for name in names]
        else:
            cards = [
                ModelCard(id=name, created=self.created, root=serving.model, max_model_len=serving.engine.max_model_len)
                for serving in self.servings.values()
                for name in serving.served_names
            ]
        if self.router is not None:
            # The alias's window is the smallest of its tiers': a request that fits it fits all.
            windows = [card.max_model_len for card in cards if card.max_model_len and card.root in self.router.config.tiers.values()]
            cards.append(ModelCard(id=self.router.alias, created=self.created, root=self.router.alias, max_model_len=min(windows) if windows else None))
        for agent in self.agents.values():
            root = agent.model or (self.router.config.tiers.get(agent.tier or "") if self.router is not None else None) or (cards[0].root if cards else None)
            cards.append(ModelCard(id=agent.model_id, created=self.created, root=root, kind="agent"))
        primary = cards[0].root if cards else None
        cards += [ModelCard(id=w.model_id, created=self.created, root=primary, kind="workflow") for w in self.workflows.values()]
        if self.embedding_name:
            cards.append(ModelCard(id=self.embedding_name, created=self.created, root=self.embedding_name, kind="embedding"))
        return cards
