"""Who runs a turn asked for by a name other than a model's: an agent (`agent:<name>`,
server/agents) or a workflow (`workflow:<name>`, server/workflows). The API's prepare
asks the actor for its request and context; the pipeline attaches it to the turn."""

from __future__ import annotations

from typing import Any, Protocol

from server.protocol import ChatCompletionRequest, ResponsesRequest


class Actor(Protocol):
    def chat_request(self, body: ChatCompletionRequest, model: str) -> ChatCompletionRequest:
        """The chat request as the actor runs it on `model` (a served model's name)."""

    def responses_request(self, body: ResponsesRequest, model: str) -> ResponsesRequest: ...

    def shape_context(self, ctx: Any) -> None:
        """A stateful turn's ContextRequest: what is stored as whose, memory on or off."""

    def attach(self, turn: Any) -> None:
        """Once the turn and its context exist, before the rails and the prompt: put
        itself on the turn (or refuse it, with a 4xx)."""
