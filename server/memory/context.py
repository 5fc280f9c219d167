"""What a stateful turn needs before and after generation.

Before: the thread's history and what each context source finds (sources.py: retrieved
knowledge, recalled memories), assembled under the token budget (window.py). After: the
turn is stored with its summary and the user's words become memories. The turn's
context stage (server/turn/context.py) calls these two steps; the routes only say which
conversation, which stores and whether to store.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from server.auth import Principal
from server.engine.base import Engine
from server.errors import InvalidRequestError
from server.memory.conversations import ConversationStore, Thread
from server.memory.episodic import EpisodicMemory, Memory
from server.memory.knowledge import Hit, KnowledgeBase
from server.memory.response_cache import ResponseCache
from server.memory.sources import ContextSource, EpisodicMemories, Knowledge
from server.memory.window import ContextWindow, Window
from server.protocol import ChatCompletionRequest
from server.telemetry import tracing

log = logging.getLogger(__name__)


@dataclass
class ContextRequest:
    """A turn that uses server-side state. `thread` None: nothing stored or replayed."""

    instructions: str
    new_messages: list[dict[str, str]]
    thread: Thread | None = None
    store: bool = True
    memory: bool = True
    vector_store_ids: list[str] = field(default_factory=list)
    max_results: int = 4  # sources per turn (the file_search tool's max_num_results)
    agent: str | None = None  # the agent answering (`agent:<name>`), stored with the turn
    # The tokens kept free for the answer (set by the turn's context stage, kept for a
    # re-assembly). Then filled in by `assemble`:
    reserve: int = 0
    window: Window | None = None
    recalled: list[Memory] = field(default_factory=list)
    sources: list[Hit] = field(default_factory=list)
    guard_events: list[Any] = field(default_factory=list)  # the retrieval rails' (guard.GuardEvent)

    @property
    def query(self) -> str:
        """The text that recall and retrieval search with: the latest user message."""
        for m in reversed(self.new_messages):
            if m["role"] == "user" and m.get("content"):
                return m["content"]
        return ""

    def citations(self) -> list[dict[str, Any]]:
        return [
            {"index": i + 1, "file_id": h.file_id, "filename": h.filename, "chunk_index": h.chunk_index, "score": round(h.score, 4)}
            for i, h in enumerate(self.sources)
        ]


class MemoryServices:
    def __init__(
        self,
        conversations: ConversationStore,
        episodic: EpisodicMemory,
        knowledge: KnowledgeBase,
        output_reserve: int = 512,
        summary_tokens: int = 160,
        *,
        guard: Any = None,
        metrics: Any = None,
        cache: ResponseCache | None = None,
    ):
        self.conversations = conversations
        self.cache = cache  # None: the response cache is off
        self.episodic = episodic
        self.knowledge = knowledge
        self.output_reserve = output_reserve
        self.summary_tokens = summary_tokens
        # What a stateful turn reads beside its history, as blocks in this order (the
        # guard's retrieval rails admit knowledge; metrics time each search).
        self.sources: list[ContextSource] = [Knowledge(knowledge, guard, metrics), EpisodicMemories(episodic, metrics)]

    async def for_chat(self, request: ChatCompletionRequest, principal: Principal) -> ContextRequest | None:
        """The context of a chat completion, or None when it is stateless: a named
        conversation keeps history and memory; vector stores (the request's, else the
        key's) add knowledge. In a conversation the request carries only new messages."""
        stores = request.vector_store_ids if request.vector_store_ids is not None else list(principal.vector_store_ids)
        if not request.conversation and not stores:
            return None
        messages = request.chat_messages(stored_history=bool(request.conversation))
        instructions = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        new = [m for m in messages if m["role"] != "system"]
        if not new:
            raise InvalidRequestError("messages needs at least one user, assistant or tool message", param="messages")
        thread = None
        if request.conversation:
            thread = await asyncio.to_thread(self.conversations.thread, principal, conversation=request.conversation)
        return ContextRequest(instructions, new, thread, store=thread is not None, memory=thread is not None, vector_store_ids=stores)

    async def assemble(self, engine: Engine, principal: Principal, ctx: ContextRequest, reserve: int, request_id: str) -> list[dict[str, str]]:
        """The turn's messages; `reserve` tokens stay free for the answer (and tool definitions)."""
        thread = ctx.thread
        wanted = [s for s in self.sources if s.wanted(ctx)]
        # History and every source are independent: read them at the same time.
        history, *found = await asyncio.gather(
            asyncio.to_thread(self.conversations.history, thread) if thread else _none(), *(s.find(principal, ctx) for s in wanted)
        )
        blocks = []
        for source in self.sources:
            items = await source.admit(ctx, found[wanted.index(source)]) if source in wanted else []
            source.keep(ctx, items)
            if items:
                blocks.append(source.block(items))
        window = await ContextWindow(engine, self.summary_tokens).assemble(
            ctx.instructions,
            blocks,
            history.turns if history else [],
            history.summary if history else "",
            history.summary_through if history else 0,
            ctx.new_messages,
            max(engine.max_model_len - reserve, 1),
            request_id,
        )
        # What did not fit was never seen by the model: do not cite or report it.
        for source in self.sources:
            if any(b.startswith(source.header) for b in window.dropped_blocks):
                source.keep(ctx, [])
        ctx.window = window
        return window.messages

    async def persist(
        self,
        principal: Principal,
        ctx: ContextRequest,
        turn_id: str,
        model: str,
        answer: dict[str, str],
        response: dict[str, Any] | None = None,
        input_items: list[dict[str, Any]] | None = None,
    ) -> None:
        if ctx.thread is None or not ctx.store:
            return
        summary = ctx.window.new_summary if ctx.window else None
        await asyncio.to_thread(
            self.conversations.save_turn, principal, ctx.thread, turn_id, model, [*ctx.new_messages, answer], response, input_items, summary, ctx.agent
        )
        if ctx.memory and ctx.query:
            with tracing.span("memory write", enclave__memory__store="episodic_memory", gen_ai__conversation__id=ctx.thread.conversation_id) as span:
                try:
                    await self.episodic.remember(principal.tenant, principal.user, ctx.thread.conversation_id, turn_id, ctx.query)
                except Exception as exc:  # the turn is stored; a memory write must not fail it
                    log.exception("writing episodic memory failed")
                    tracing.set_attributes(span, error__type=type(exc).__qualname__)


async def _none() -> None:
    return None
