"""Rails compiled into a plan of actions: the stage's flows run without NeMo's Colang
interpreter when each is one of the two shapes every rail of rails/ has:

    $r = execute ACTION(name=value, text=$user_message)   # or $bot_message
    if $r.is_transform
      $user_message = $r.transform_text["user_message"]   # the text the next rail reads

    $r = execute ACTION(...)
    if $r.is_blocked
      bot SOME MESSAGE
      stop

The plan is read from the flows NeMo parsed (the merged base and deployment rails), so
`rails/` stays the policy operators edit and the actions stay those it names; NeMo's
runtime gets the same actions with the same arguments (the special ones included:
`config`, `context`, registered parameters such as `enclave`). A stage with any flow of
another shape is not compiled and runs through NeMo, as does a check whose action fails
(NeMo's own failure handling then decides). Interpreting a pass of four input rails cost
about 13 ms on these cores on top of the rails' own work (scripts/bench_guard.py).
"""

from __future__ import annotations

import inspect
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

_VAR = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")


@dataclass(frozen=True)
class Step:
    rail: str  # the flow's name: what metrics, traces and the audit call the rail
    action: str
    params: dict[str, Any]  # literal values, or "$name" for a context variable
    kind: Literal["transform", "block"]
    target: str = ""  # the variable a transform sets
    message: str = ""  # the bot message a block says


@dataclass
class Activated:
    """One rail that ran, in the terms of NeMo's `activated_rails` log entries."""

    name: str
    outcome: Any  # the action's RailOutcome (None: it returned none)
    stop: bool
    started_at: float | None
    finished_at: float | None
    duration: float | None


@dataclass
class PlanResult:
    text: str  # the checked variable after every transform, or the block's bot message
    rails: list[Activated]
    blocked: bool


class RailPlan:
    def __init__(self, steps: list[Step], rails: Any, variable: str):
        self.steps = steps
        self.variable = variable  # user_message (input-like stages) or bot_message (output)
        self._dispatcher = rails.runtime.action_dispatcher
        self._registered = rails.runtime.registered_action_params
        self._config = rails.config
        self._bot_messages = rails.config.bot_messages
        self._signatures: dict[str, Any] = {}

    @classmethod
    def compile(cls, rails: Any, flow_ids: list[str], variable: str) -> RailPlan | None:
        """The plan of these flows, or None when one of them has another shape (or its
        action or bot message is unknown): then NeMo runs the stage."""
        by_id = {f["id"]: f for f in rails.config.flows}
        steps = []
        for flow_id in flow_ids:
            flow = by_id.get(flow_id)
            step = _step(flow_id, flow["elements"], variable) if flow is not None else None
            if step is None or rails.runtime.action_dispatcher.get_action(step.action) is None:
                return None
            if step.kind == "block" and not rails.config.bot_messages.get(step.message):
                return None
            steps.append(step)
        return cls(steps, rails, variable)

    async def run(self, text: str, context: dict[str, Any] | None) -> PlanResult:
        """Each rail in order on `text`, as NeMo would run them. Raises when an action
        fails (the caller runs the check through NeMo instead)."""
        variables: dict[str, Any] = {"user_message": "", "bot_message": "", **(context or {})}
        variables[self.variable] = text
        ran: list[Activated] = []
        for step in self.steps:
            started = time.time()
            outcome = await self._execute(step, variables)
            stop = step.kind == "block" and bool(outcome.is_blocked)
            finished = time.time()
            ran.append(Activated(step.rail, outcome, stop, started, finished, finished - started))
            if stop:
                return PlanResult(random.choice(self._bot_messages[step.message]), ran, True)
            if step.kind == "transform" and outcome.is_transform:
                variables[step.target] = outcome.transform_text[step.target]
        return PlanResult(variables[self.variable], ran, False)

    async def _execute(self, step: Step, variables: dict[str, Any]) -> Any:
        fn = self._dispatcher.get_action(step.action)
        parameters = self._signatures.get(step.action)
        if parameters is None:
            parameters = inspect.signature(fn).parameters if inspect.isfunction(fn) or inspect.ismethod(fn) else {}
            self._signatures[step.action] = parameters
        kwargs = {}
        for name, value in step.params.items():
            var = _VAR.match(value) if isinstance(value, str) else None
            kwargs[name] = variables.get(var.group(1), value) if var else value
        # The special parameters NeMo's runtime passes (colang/v1_0/runtime/runtime.py).
        if "context" in parameters:
            kwargs["context"] = variables
        if "config" in parameters:
            kwargs["config"] = self._config
        for name, value in self._registered.items():
            if name in parameters:
                kwargs[name] = value
        result, status = await self._dispatcher.execute_action(step.action, kwargs)
        if status != "success" or not hasattr(result, "decision"):
            raise RuntimeError(f"rail action {step.action} failed")
        return result


def _step(flow_id: str, elements: list[dict[str, Any]], variable: str) -> Step | None:
    body = [e for e in elements if e.get("_type") != "meta"]
    if len(body) < 3 or body[0].get("_type") != "run_action" or body[1].get("_type") != "if":
        return None
    call, test = body[0], body[1]
    result = call.get("action_result_key")
    action = call.get("action_name")
    params = call.get("action_params") or {}
    if not result or not action or action == "utter" or not isinstance(params, dict):
        return None
    if f"${variable}" not in params.values():
        return None  # a rail that does not read the checked text is not a check we know
    rest = body[2:]
    expression = test.get("expression")
    if expression == f"${result}.is_transform" and len(rest) == 1 and test.get("_next_else") == 2:
        target = rest[0].get("key")
        if rest[0].get("_type") == "set" and rest[0].get("expression") == f'${result}.transform_text["{target}"]' and target == variable:
            return Step(flow_id, action, dict(params), "transform", target=target)
        return None
    if expression == f"${result}.is_blocked" and len(rest) == 2 and test.get("_next_else") == 3:
        say, stop = rest
        if _utter(say) and _utter(stop) == "stop" and _utter(say) != "stop":
            return Step(flow_id, action, dict(params), "block", message=_utter(say))
    return None


def _utter(element: dict[str, Any]) -> str:
    if element.get("_type") == "run_action" and element.get("action_name") == "utter":
        return str((element.get("action_params") or {}).get("value") or "")
    return ""
