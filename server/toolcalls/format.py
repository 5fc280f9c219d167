"""How tools reach the prompt and how calls come back out of the generated text.

Chat templates disagree on tools (SmolLM2's ChatML has none), so tool definitions go
into the system message in one model-neutral form, assistant calls in history are
written back exactly as the model is constrained to write them, and `tool` results keep
their role. The constraint (constraint.py) guarantees the shape; CallParser turns the
text, as it streams, into OpenAI tool-call deltas: the name first, then fragments of the
arguments that join into the exact JSON the constraint accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.ids import new_id
from server.toolcalls.spec import ToolPlan


def new_call_id() -> str:
    return new_id("tool_call")


def tools_prompt(plan: ToolPlan, choice: str) -> str:
    listing = json.dumps(
        [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in plan.tools],
        ensure_ascii=False,
    )
    how = 'To call tools, reply with only a JSON array: [{"name": "<tool name>", "arguments": {<arguments>}}]'
    if choice == "auto":
        rule = "Call a tool when it helps; otherwise answer the user directly in plain text."
    elif choice == "required":
        rule = "You must call one or more tools now."
    else:
        rule = f"You must call the tool `{choice}` now."
    return f"You can use these tools:\n{listing}\n{how}. {rule}"


def call_text(calls: list[dict[str, Any]]) -> str:
    """Calls as the model writes them, for assistant messages in the history."""
    out = []
    for call in calls:
        fn = call.get("function") or {}
        raw = fn.get("arguments") or "{}"
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            args = raw
        out.append({"name": fn.get("name", ""), "arguments": args})
    return json.dumps(out, ensure_ascii=False)


def with_tools_prompt(messages: list[dict[str, str]], plan: ToolPlan | None, choice: str) -> list[dict[str, str]]:
    """`messages` with the tool definitions merged into the (first) system message."""
    if plan is None or choice == "none":
        return messages
    prompt = tools_prompt(plan, choice)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}] + messages[1:]
    return [{"role": "system", "content": prompt}] + messages


# ---------------------------------------------------------------- parsing


@dataclass
class ParsedCall:
    id: str
    name: str = ""
    arguments: str = ""
    complete: bool = False
    duplicate: bool = False


@dataclass
class Delta:
    """What one piece of generated text added: text, or tool-call events."""

    text: str = ""
    started: list[ParsedCall] = field(default_factory=list)  # calls whose name just became known
    fragments: list[tuple[int, str]] = field(default_factory=list)  # (call index, argument text)
    completed: list[int] = field(default_factory=list)  # indexes of calls whose arguments closed


class CallParser:
    """Incremental reader of one choice's output: plain text, or a JSON array of calls.

    The constraint fixes the layout (`name` before `arguments`, arguments an object), so a
    small scanner that tracks strings, escapes and nesting depth is enough; no partial
    JSON parsing, and nothing is re-scanned.
    """

    def __init__(self) -> None:
        self.mode: str | None = None  # "text" | "calls"
        self.text = ""
        self.calls: list[ParsedCall] = []
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string = ""  # the string being read at depth 2 (a key or the name)
        self._key = ""  # last key read at depth 2
        self._in_args = False

    def feed(self, chunk: str) -> Delta:
        delta = Delta()
        if self.mode is None:
            stripped = chunk.lstrip()
            if not stripped:
                self.text += chunk
                return delta
            self.mode = "calls" if stripped[0] == "[" else "text"
            if self.mode == "text":
                chunk = self.text + chunk
                self.text = ""
        if self.mode == "text":
            self.text += chunk
            delta.text = chunk
            return delta
        self.text += chunk
        args_from: int | None = 0 if self._in_args else None
        for i, c in enumerate(chunk):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    if self._depth == 2 and not self._in_args:
                        self._end_string(delta)
                    continue
                if self._depth == 2 and not self._in_args:
                    self._string += c
                continue
            if c == '"':
                self._in_string = True
                self._string = ""
            elif c in "{[":
                self._depth += 1
                if self._depth == 2 and c == "{":
                    self.calls.append(ParsedCall(new_call_id()))
                    self._key = ""
                elif self._depth == 3 and self._key == "arguments" and not self._in_args:
                    self._in_args = True
                    args_from = i
            elif c in "}]":
                self._depth -= 1
                if self._in_args and self._depth == 2:
                    self._flush(delta, chunk, args_from, i + 1)
                    self._in_args = False
                    self.calls[-1].complete = True
                    delta.completed.append(len(self.calls) - 1)
                    args_from = None
        if self._in_args and args_from is not None:
            self._flush(delta, chunk, args_from, len(chunk))
        return delta

    def _end_string(self, delta: Delta) -> None:
        # At depth 2 strings alternate key, value: the one after the key "name" is the name.
        if self._key == "name" and not self.calls[-1].name:
            self.calls[-1].name = json.loads(f'"{self._string}"')
            delta.started.append(self.calls[-1])
            self._key = ""
        else:
            self._key = self._string

    def _flush(self, delta: Delta, chunk: str, start: int, end: int) -> None:
        piece = chunk[start:end]
        if piece:
            self.calls[-1].arguments += piece
            delta.fragments.append((len(self.calls) - 1, piece))

    @property
    def is_calls(self) -> bool:
        return self.mode == "calls"

    def finished_calls(self) -> list[ParsedCall]:
        return [c for c in self.calls if c.complete and not c.duplicate]

    def is_repeat(self, k: int) -> bool:
        """Whether call k repeats an earlier call exactly (small models loop on `,`)."""
        call = self.calls[k]
        key = (call.name, canonical_arguments(call.arguments))
        return any((c.name, canonical_arguments(c.arguments)) == key for c in self.calls[:k] if c.complete and not c.duplicate)


def canonical_arguments(raw: str) -> str:
    """Arguments JSON in one spelling, to compare calls."""
    try:
        return json.dumps(json.loads(raw), sort_keys=True)
    except ValueError:
        return raw
