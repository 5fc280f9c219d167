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

Nested arguments are sized the same way, for their longest instance: each array without
a small enough `maxItems` gets one (at most ITEMS items, fewer when the budget is short,
never fewer than its `minItems`), and the free strings at every depth share what is left.
The constraint then holds the whole call to that size, so a call such as
`{"items": [{"sku": …}]}` closes in time instead of being cut in the middle of a string.
A schema with something of no computable size (an open object, a union, a reference, a
formatted string) is left as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
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


# The most items an array is sized for when its schema allows more (or sets no bound), and
# the characters a free string should keep before arrays are given fewer items.
ITEMS = 8
MIN_SHARE = 8


@dataclass
class _Shape:
    """The longest instance of a schema with every array at `items` items: its skeleton
    (strings empty), the characters of its bounded values, its free strings and the
    optional spaces the constraint allows between its parts."""

    skeleton: Any = None
    values: int = 0
    free: int = 0
    min_length: int = 0  # the largest minLength among the free strings
    spaces: int = 0


def _count(node: Any, items: int, shape: _Shape) -> Any:
    """The skeleton of `node`'s longest instance, adding its sizes to `shape`; None when
    it has no size."""
    if not isinstance(node, dict):
        return None
    if _free(node):
        shape.free += 1
        shape.min_length = max(shape.min_length, int(node.get("minLength", 0)))
        return ""
    kind = node.get("type", "object" if "properties" in node else None)
    if kind == "object" and isinstance(node.get("properties"), dict) and node["properties"]:
        out = {}
        for key, child in node["properties"].items():
            sub = _count(child, items, shape)
            if sub is None:
                return None
            out[key] = sub
            shape.spaces += SPACES_PER_KEY
        shape.spaces += 2
        return out
    if kind == "array" and isinstance(node.get("items"), dict):
        n = _items(node, items)
        item = _Shape()
        sub = _count(node["items"], items, item)
        if sub is None:
            return None
        shape.values += n * item.values
        shape.free += n * item.free
        shape.spaces += n * (item.spaces + SPACES_PER_KEY) + 2
        shape.min_length = max(shape.min_length, item.min_length if n else 0)
        return [sub] * n
    chars = _value_chars(node)
    if chars is None:
        return None
    shape.values += chars
    return ""


def _items(node: dict[str, Any], items: int) -> int:
    """How many items an array is sized for: `items`, within its own bounds."""
    return max(int(node.get("minItems", 0)), min(items, int(node.get("maxItems", items))))


def _has_arrays(node: Any) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == "array":
        return True
    return any(_has_arrays(child) for child in (node.get("properties") or {}).values())


def _capped(node: Any, items: int, share: int) -> Any:
    """`node` with its arrays held to the items they were sized for and its free strings
    to `share` characters."""
    if _free(node):
        return node if node.get("maxLength", share + 1) <= share else node | {"maxLength": share}
    if node.get("type", "object") == "object" and isinstance(node.get("properties"), dict):
        return node | {"properties": {k: _capped(v, items, share) for k, v in node["properties"].items()}}
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        n = _items(node, items)
        return node | {"items": _capped(node["items"], items, share)} | ({"maxItems": n} if node.get("maxItems", n + 1) > n else {})
    return node


def fit(name: str, parameters: dict[str, Any], max_tokens: int, count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    """`parameters` with its free strings' `maxLength` lowered, and its arrays given a
    `maxItems`, so that one call of `name` fits in `max_tokens`, counted by `count_tokens`
    (the engine's tokenizer; without one, two characters a token); the schema itself when
    it already fits or cannot be sized."""
    props = parameters.get("properties")
    if not isinstance(props, dict) or not props:
        return parameters
    # The most items first: fewer only while the free strings would be left too short.
    counts = range(ITEMS, 0, -1) if _has_arrays(parameters) else (ITEMS,)
    chosen: tuple[int, int] | None = None
    for items in counts:
        shape = _Shape()
        arguments = _count(parameters, items, shape)
        if arguments is None:
            return parameters  # something of no computable size: no size to promise
        skeleton = json.dumps([{"name": name, "arguments": arguments}], ensure_ascii=False)
        tokens = count_tokens(skeleton) if count_tokens is not None else (len(skeleton) + 1) // 2
        # The arguments' own braces are among the call's spaces (SPACES_PER_CALL).
        room = max_tokens - tokens - (shape.spaces - 2) - SPACES_PER_CALL - shape.values
        share = room // shape.free if shape.free else (max_tokens if room >= 0 else -1)
        if share >= max(MIN_SHARE, shape.min_length) or (share >= shape.min_length and chosen is None):
            chosen = (items, share)
            if share >= MIN_SHARE:
                break
    if chosen is None:
        return parameters  # no room for the shortest call: leave the schema whole
    sized = _capped(parameters, *chosen)
    return parameters if sized == parameters else sized
