"""Closing a call that max_tokens cut: the arguments a model was writing, completed with
the fewest characters the tool's schema accepts.

Calls are sized to close within max_tokens where their schema has a size
(server/toolcalls/budget.py). Where it has none (an open object, a union, a formatted
string), or where the model's tokenizer spends more than the budget counted, the
generation can still stop mid-call. Its first call has then been streamed in part, so
the only repair that keeps the stream consistent is to append: the open string is closed,
each missing required property gets the smallest value its schema allows, every open
array and object is closed. The result is checked against the schema; when no tail makes
it valid (a patterned string cut half-way), there is no repair and the caller drops the
call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema

_LITERALS = ("true", "false", "null")


class _NoValue(Exception):
    """No smallest value can be built for a schema (a pattern, a format)."""


def smallest(schema: Any) -> Any:
    """The smallest value `schema` accepts, as far as it can be built without search."""
    if not isinstance(schema, dict) or not schema:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for union in ("anyOf", "oneOf"):
        for branch in schema.get(union) or []:
            try:
                return smallest(branch)
            except _NoValue:
                continue
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = "null" if "null" in kind else (kind[0] if kind else None)
    if kind == "string":
        if "pattern" in schema or "format" in schema:
            raise _NoValue
        return "x" * int(schema.get("minLength", 0))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        value = 0 if low is None else (low + 1 if "exclusiveMinimum" in schema and "minimum" not in schema else low)
        high = schema.get("maximum")
        value = value if high is None else min(value, high)
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return False
    if kind == "array":
        return [smallest(schema.get("items") or {}) for _ in range(int(schema.get("minItems", 0)))]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: smallest(props.get(k) or {}) for k in schema.get("required") or []}
    return None


@dataclass
class _Open:
    """An array or object still open in the partial text."""

    kind: str  # "array" or "object"
    schema: Any
    keys: list[str] = field(default_factory=list)  # an object's keys written so far
    key: str | None = None  # the key whose value is being written
    expect: str = "value"  # array: "value" or "comma"; object: "key", "colon", "value" or "comma"
    items: int = 0  # an array's items so far
    after_comma: bool = False  # a comma was written: one more member must follow


def _child(node: _Open) -> Any:
    if not isinstance(node.schema, dict):
        return {}
    if node.kind == "array":
        return node.schema.get("items") or {}
    return ((node.schema.get("properties") or {}).get(node.key or "")) or {}


def close(partial: str, schema: dict[str, Any]) -> str | None:
    """The tail that completes the arguments `partial` into a value `schema` accepts, or
    None when there is none (or `partial` is not the start of a JSON object)."""
    try:
        tail = _tail(partial, schema)
        value = json.loads(partial + tail)
        jsonschema.validate(value, schema)
    except (_NoValue, ValueError, jsonschema.ValidationError, jsonschema.SchemaError, RecursionError):
        return None
    return tail


def _tail(partial: str, schema: dict[str, Any]) -> str:
    stack: list[_Open] = []
    in_string = escape = False
    string_start = 0
    scalar = ""  # a number or literal being written
    started = False

    def value_done() -> None:
        if stack:
            stack[-1].expect = "comma"
            stack[-1].after_comma = False
            if stack[-1].kind == "array":
                stack[-1].items += 1

    for i, ch in enumerate(partial):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
                top = stack[-1] if stack else None
                if top is not None and top.kind == "object" and top.expect == "key":
                    top.key = json.loads(partial[string_start : i + 1])
                    top.keys.append(top.key)
                    top.expect, top.after_comma = "colon", False
                else:
                    value_done()
            continue
        if ch.isspace():
            if scalar:
                scalar = ""
                value_done()
            continue
        if scalar and ch in ",]}":
            scalar = ""
            value_done()
        if ch == '"':
            in_string, string_start = True, i
        elif ch in "{[":
            parent = _child(stack[-1]) if stack else schema
            stack.append(_Open("object" if ch == "{" else "array", parent, expect="key" if ch == "{" else "value"))
            started = True
        elif ch in "}]":
            stack.pop()
            value_done()
        elif ch == ":":
            stack[-1].expect = "value"
        elif ch == ",":
            stack[-1].expect = "key" if stack[-1].kind == "object" else "value"
            stack[-1].after_comma = True
        else:
            scalar += ch
    if not started:
        raise _NoValue
    out = ""
    top = stack[-1] if stack else None
    if in_string:
        if escape:
            out += "n"
        if top is not None and top.kind == "object" and top.expect == "key":
            key = json.loads(partial[string_start:] + out + '"')
            top.key = key
            top.keys.append(key)
            out += '"'
            top.expect, top.after_comma = "colon", False
        else:
            child = _child(top) if top is not None else {}
            text = json.loads(partial[string_start:] + out + '"')
            # A cut enum member is finished as the first member it begins.
            members = [m for m in child.get("enum") or [] if isinstance(m, str) and m.startswith(text)] if isinstance(child, dict) else []
            out += (members[0][len(text) :] if members else "x" * max(0, int(child.get("minLength", 0)) - len(text)) if isinstance(child, dict) else "") + '"'
            value_done()
    elif scalar:
        literal = next((w for w in _LITERALS if w.startswith(scalar)), None)
        if literal is not None:
            out += literal[len(scalar) :]
        elif scalar[-1] in "-+.eE":
            out += "0"
        value_done()
    while stack:
        node = stack.pop()
        spec = node.schema if isinstance(node.schema, dict) else {}
        if node.kind == "object":
            if node.expect == "colon":
                out += ": "
                node.expect = "value"
            if node.expect == "value":
                out += json.dumps(smallest(_child(node)), ensure_ascii=False)
            props = spec.get("properties") or {}
            missing = [k for k in spec.get("required") or [] if k not in node.keys]
            if node.after_comma and not missing:
                # A comma cannot be taken back: one more member, any the schema allows.
                missing = [k for k in props if k not in node.keys][:1]
                if not missing:
                    raise _NoValue
            for key in missing:
                out += (", " if node.keys and not node.after_comma else "") + json.dumps(key) + ": " + json.dumps(smallest(props.get(key) or {}), ensure_ascii=False)
                node.keys.append(key)
                node.after_comma = False
            out += "}"
        else:
            needed = max(int(spec.get("minItems", 0)) - node.items, 1 if node.after_comma else 0)
            for n in range(needed):
                out += (", " if (node.items or n) and not (node.after_comma and n == 0) else "") + json.dumps(smallest(_child(node)), ensure_ascii=False)
            out += "]"
        if stack:
            stack[-1].expect = "comma"
            stack[-1].after_comma = False
            if stack[-1].kind == "array":
                stack[-1].items += 1
    return out
