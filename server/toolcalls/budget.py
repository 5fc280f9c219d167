"""Calls that fit in max_tokens: free-text arguments capped so that a whole call, closed,
fits in the tokens the step may generate.

A model writing a free string (`{"reason": "I am not able to…`) stops only when it
chooses to; cut by max_tokens, the call is unterminated JSON that no client can run. So
the string parameters without an enum or a pattern share what the rest of the call
leaves of max_tokens, as a `maxLength`, and the call closes in time (the string may end
early; the JSON does not break).

What the rest costs is counted with the model's own tokenizer: the call's skeleton (its
name, keys and punctuation, every value empty) as the tokenizer writes it, a token for
each optional space the constraint allows, and each bounded value (a number, an id, an
enum member) at one token a character. A free string's characters count one token each,
which holds for ASCII text; a string in a script whose characters take several byte
tokens can still run past the budget, and the turn then keeps the calls completed before
the cut (server/turn/tool_loop.py).

Only calls whose arguments are flat (strings, numbers, booleans, enums) are sized; a
schema with nested objects or arrays has no bound to compute and is left as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# The longest a bounded value is counted, in characters: a number in JSON (sign, digits,
# fraction) and a patterned string (the patterns of ids and codes).
NUMBER_CHARS = 16
PATTERN_CHARS = 32
# Optional spaces the constraint allows around a call's punctuation, each possibly a token
# of its own.
SPACES_PER_KEY = 3
SPACES_PER_CALL = 6


def _value_chars(node: dict[str, Any]) -> int | None:
    """The most characters the value of `node` takes, or None when unbounded or not flat."""
    if "enum" in node:
        return max(len(json.dumps(v, ensure_ascii=False)) for v in node["enum"]) if node["enum"] else None
    if "const" in node:
        return len(json.dumps(node["const"], ensure_ascii=False))
    kind = node.get("type")
    if kind in ("integer", "number"):
        return NUMBER_CHARS
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind == "string" and isinstance(node.get("pattern"), str):
        return min(PATTERN_CHARS, node.get("maxLength", PATTERN_CHARS)) + 2
    return None


def _free(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "string" and not any(k in node for k in ("enum", "const", "pattern", "format"))


def fit(name: str, parameters: dict[str, Any], max_tokens: int, count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    """`parameters` with the free strings' `maxLength` lowered so that one call of `name`
    fits in `max_tokens`, counted by `count_tokens` (the engine's tokenizer; without
    one, two characters a token); the schema itself when it already does or cannot be
    sized."""
    props = parameters.get("properties")
    if not isinstance(props, dict) or not props:
        return parameters
    free = [k for k, node in props.items() if _free(node)]
    if not free:
        return parameters
    values = 0
    for key, node in props.items():
        if key in free:
            continue
        chars = _value_chars(node) if isinstance(node, dict) else None
        if chars is None:
            return parameters  # nested or unbounded: no size to promise
        values += chars
    skeleton = json.dumps([{"name": name, "arguments": dict.fromkeys(props, "")}], ensure_ascii=False)
    tokens = count_tokens(skeleton) if count_tokens is not None else (len(skeleton) + 1) // 2
    spaces = SPACES_PER_CALL + SPACES_PER_KEY * len(props)
    share = (max_tokens - tokens - spaces - values) // len(free)
    capped = {}
    for key in free:
        node = props[key]
        if node.get("maxLength", share + 1) <= share:
            continue
        if share < node.get("minLength", 0):
            return parameters  # no room for the shortest value: leave the schema whole
        capped[key] = node | {"maxLength": share}
    if not capped:
        return parameters
    return parameters | {"properties": {k: capped.get(k, v) for k, v in props.items()}}
