"""The context stage: what a stateful turn's model reads besides the new input.

The history, summary, recalled memories and retrieved sources are assembled by
`memory.context.MemoryServices` under the token budget; this stage decides the budget
(the answer's reserve and the tool definitions' room), assembles again when the input
rails rewrote the input, and strips a refused turn of everything but its own words.
"""

from __future__ import annotations

from server.engine.base import Engine
from server.memory.context import MemoryServices
from server.toolcalls.format import tools_prompt
from server.turn.state import Turn


class ContextStage:
    def __init__(self, memory: MemoryServices, engine: Engine):
        self.memory = memory
        self.engine = engine

    def reserve(self, turn: Turn) -> int:
        """Tokens kept free for the answer, and for the tool definitions that join the
        system message later."""
        request, plan = turn.req.request, turn.req.plan
        max_out = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        tool_tokens = self.engine.count_tokens(tools_prompt(plan, "auto")) + 8 if plan is not None else 0
        return (max_out if max_out is not None else min(self.memory.output_reserve, self.engine.max_model_len // 4)) + tool_tokens

    async def assemble(self, turn: Turn) -> None:
        ctx = turn.context
        assert ctx is not None
        if not ctx.reserve:
            ctx.reserve = self.reserve(turn)
        turn.step.messages = await self.memory.assemble(self.engine, turn.req.principal, ctx, ctx.reserve, turn.request_id)

    @staticmethod
    def refuse(turn: Turn) -> None:
        """A refused turn is stored (the user's masked words and the refusal) but never
        becomes a memory, and neither retrieves nor cites anything."""
        ctx = turn.context
        assert ctx is not None
        ctx.memory, ctx.vector_store_ids, ctx.sources, ctx.recalled = False, [], [], []
        turn.step.messages = ctx.new_messages
