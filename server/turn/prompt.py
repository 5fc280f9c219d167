"""The prompt stage: a step's messages rendered by the chat template, with the output
constraint its tool choice needs; and what an engine failure to constrain means."""

from __future__ import annotations

import dataclasses

from server.engine.base import Engine
from server.errors import EnclaveError, EngineError, InvalidRequestError
from server.guard import Guard
from server.toolcalls.budget import fit
from server.toolcalls.constraint import TEXT, build_constraint
from server.toolcalls.format import with_tools_prompt
from server.toolcalls.grounding import conversation_text, ground
from server.turn.state import Progress, Turn


class Prompt:
    def __init__(self, engine: Engine, guard: Guard | None, grounding: bool = False):
        """`grounding`: tool arguments constrained to values of the conversation."""
        self.engine = engine
        self.guard = guard
        self.grounding = grounding

    def render(self, turn: Turn, choice: str) -> None:
        """Prompt and parameters for the next generation step under `choice`."""
        plan, step = turn.req.plan, turn.step
        step.call_schemas = {}
        if plan is not None and turn.offered is not None and choice in ("auto", "required"):
            plan = dataclasses.replace(plan, tools=turn.offered)  # the shortlist, in the prompt too
        messages = self.guard.mark_system_prompt(step.messages) if self.guard is not None else step.messages
        prompt = self.engine.render_chat(with_tools_prompt(messages, plan, choice))
        params = turn.req.request.to_generation_params(len(prompt), self.engine.max_model_len)
        if plan is not None and choice != "none":
            tools = plan.tools if choice in ("auto", "required") else [plan.by_name[choice]]
            said = conversation_text(step.messages) if self.grounding else ""
            # Each call: its arguments grounded in what was said, its free text sized to
            # close within max_tokens.
            schemas = [(t.name, fit(t.name, ground(t.parameters, said), params.max_tokens, self.engine.count_tokens)) for t in tools]
            constraint = build_constraint(schemas, allow_text=choice == "auto", parallel=plan.parallel)
            params = dataclasses.replace(params, regex=constraint.regex, json_schema=None)
            step.call_schemas = dict(schemas)
        elif plan is not None and params.json_schema is None:
            # "none" with calls in the history: small models imitate them as text; the
            # answer must be prose.
            params = dataclasses.replace(params, regex=TEXT)
        step.prompt_token_ids, step.params, step.tool_choice = prompt, params, choice

    @staticmethod
    def engine_failure(turn: Turn, progress: Progress) -> EnclaveError:
        """vLLM compiles the constraint in its engine core and reports a failure only as
        finish_reason "error"; a schema too complex to compile is the usual cause."""
        params, choice = turn.step.params, turn.step.tool_choice
        if params.regex is not None and progress.completion_tokens == 0:
            plan = turn.req.plan
            assert plan is not None
            names = [t.name for t in plan.tools] if choice in ("auto", "required") else [choice]
            return InvalidRequestError(
                f"the parameters schema of tool(s) {', '.join(f'`{n}`' for n in names)} could not be compiled into an "
                "output constraint (too complex or unsupported); simplify it",
                param="tools",
                code="invalid_tool_schema",
            )
        if params.json_schema is not None and progress.completion_tokens == 0:
            return InvalidRequestError(
                "response_format: the JSON schema could not be compiled into an output constraint "
                "(too complex or unsupported); simplify the schema",
                param="response_format",
                code="invalid_json_schema",
            )
        return EngineError("the engine failed while generating")
