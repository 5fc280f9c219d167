"""Arguments grounded in what was said: where a parameter's value must come from the
conversation, the constraint offers only the values that occur in it.

A 135M model asked for `{"ticket_id": …}` writes a plausible id, not the one the user
typed; its arguments are only as good as its copying. So before generation each top-level
parameter with a shape (a string `pattern`, a number) is looked up in the conversation:

* a string with a `pattern` → the spans of the conversation that match the pattern
  (ticket and order ids, codes, dates written as the pattern wants them);
* an integer or a number → the numbers written in the conversation that fit its bounds
  (amounts, quantities), as JSON numbers;
* a string `enum` → the members whose words were said ("damaged", "cancelled the
  service" for `cancelled_service`), with the catch-all members (`other`) kept beside
  them: a catch-all is never evidence, and must stay choosable.

When some fit, the parameter becomes an `enum` of them: the model still chooses which, and
may choose none only if the schema lets it leave the parameter out. When none fit, the
parameter is generated freely under its own schema, as before. Booleans and free text (a
reason, a message) are left alone: their values are the model's words.

The conversation is what the user, the assistant and the tools said: an id a tool
returned (or the assistant repeated from one) is as good as one the user typed; the
system prompt is not a source.
"""

from __future__ import annotations

import re
from typing import Any

from server.toolcalls.constraint import check_patterns

# At most this many candidates per parameter: beyond that the conversation is a document
# pasted in, or the pattern fits any word, and the parameter is left free.
MAX_CANDIDATES = 12
# A number as people write it, not part of a word or an id ("ORD-5002", "v2", "T-1001"):
# digits with an optional decimal part after a point or a comma.
_NUMBER = re.compile(r"(?<![\w.,-])-?\d+(?:[.,]\d+)?(?![\w-]|[.,]\d)")


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """The text the values may come from: user, assistant and tool messages, in order."""
    return "\n".join(m["content"] for m in messages if m.get("role") in ("user", "assistant", "tool") and isinstance(m.get("content"), str))


def _unanchored(pattern: str) -> re.Pattern | None:
    # JSON schema patterns are searched, not matched; ids are usually written anchored
    # (^T-[0-9]{4}$), which must become word edges to find them inside a sentence.
    body = pattern.removeprefix("^").removesuffix("$")
    try:
        return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])")
    except re.error:
        return None


def _distinct(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out if len(out) <= MAX_CANDIDATES else []


def _pattern_values(node: dict[str, Any], text: str) -> list[str]:
    try:
        # A client's pattern runs over the conversation here, before the constraint is
        # built: the same checks first, so no pattern can backtrack for ever.
        check_patterns(node)
        full = re.compile(node["pattern"])
    except (ValueError, re.error):
        return []  # the constraint refuses it with a 400 that names the tool
    found = _unanchored(node["pattern"])
    if found is None:
        return []
    lo, hi = node.get("minLength", 0), node.get("maxLength")
    spans = [m.group() for m in found.finditer(text)]
    return _distinct([s for s in spans if full.search(s) and len(s) >= lo and (hi is None or len(s) <= hi) and '"' not in s and "\\" not in s])


def _fits(value: float, node: dict[str, Any]) -> bool:
    lo, hi = node.get("minimum"), node.get("maximum")
    xlo, xhi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    return (
        (lo is None or value >= lo)
        and (hi is None or value <= hi)
        and (xlo is None or value > xlo)
        and (xhi is None or value < xhi)
        and (node.get("multipleOf") is None or (value / node["multipleOf"]).is_integer())
    )


def _number_values(node: dict[str, Any], text: str) -> list[int | float]:
    out: list[int | float] = []
    for m in _NUMBER.finditer(text):
        raw = m.group()
        # A comma before exactly three digits groups thousands ("1,200"); before one or
        # two it is a decimal comma ("12,50").
        raw = raw.replace(",", "") if re.fullmatch(r"-?\d+,\d{3}", raw) else raw.replace(",", ".")
        value = float(raw)
        if node["type"] == "integer":
            if "." in raw:
                continue
            value = int(raw)
        elif value.is_integer() and "." not in raw:
            value = int(raw)
        if _fits(value, node):
            out.append(value)
    return _distinct(out)


CATCH_ALL = {"other", "others", "unknown", "none", "unspecified", "misc", "general"}
_WORD = re.compile(r"[a-z0-9]+")


def _same_word(said: str, member: str) -> bool:
    # Forms of one word ("charged"/"charge", "cancel"/"cancelled"): a shared stem of five
    # letters; short words must be said exactly.
    if said == member:
        return True
    n = min(len(said), len(member), 5)
    return n >= 5 and said[:n] == member[:n]


def _enum_values(node: dict[str, Any], text: str) -> list[Any]:
    members = [m for m in node["enum"] if isinstance(m, str)]
    if len(members) < 2 or len(members) != len(node["enum"]):
        return []
    said = set(_WORD.findall(text.lower()))
    matched = [
        m
        for m in members
        if m.lower() not in CATCH_ALL and (words := _WORD.findall(m.lower())) and all(any(_same_word(w, x) for w in said) for x in words)
    ]
    if not matched:
        return []
    return [m for m in members if m in matched or m.lower() in CATCH_ALL]


def shaped(node: Any) -> bool:
    """Whether `candidates` looks for a parameter's values in the conversation: an enum,
    a string with a pattern, a number."""
    return isinstance(node, dict) and ("enum" in node or (node.get("type") == "string" and isinstance(node.get("pattern"), str)) or node.get("type") in ("integer", "number"))


def has_catch_all(node: Any) -> bool:
    """Whether an enum has a catch-all member (`other`): one it may always take."""
    return isinstance(node, dict) and any(isinstance(m, str) and m.lower() in CATCH_ALL for m in node.get("enum") or [])


def candidates(node: Any, text: str) -> list[Any]:
    """The values of the conversation one parameter schema may take ([] when it has no
    shape to look for, or nothing fits)."""
    if not isinstance(node, dict) or "const" in node:
        return []
    if "enum" in node:
        values = _enum_values(node, text)
        return values if len(values) < len(node["enum"]) else []
    kind = node.get("type")
    if kind == "string" and isinstance(node.get("pattern"), str):
        return _pattern_values(node, text)
    if kind in ("integer", "number"):
        return _number_values(node, text)
    return []


def ground(parameters: dict[str, Any], text: str) -> dict[str, Any]:
    """`parameters` with each shaped top-level property narrowed to the values of `text`
    that fit it; the schema itself when nothing is narrowed (so its compiled constraint
    is shared)."""
    props = parameters.get("properties")
    if not isinstance(props, dict) or not text:
        return parameters
    narrowed = {}
    for name, node in props.items():
        values = candidates(node, text)
        if values:
            narrowed[name] = {"enum": values} | ({"description": node["description"]} if "description" in node else {})
    if not narrowed:
        return parameters
    return parameters | {"properties": {name: narrowed.get(name, node) for name, node in props.items()}}


def grounded_fields(parameters: dict[str, Any], text: str) -> tuple[int, int]:
    """(required shaped parameters whose value is in `text`, those whose value is not):
    how well a tool fits what was said, for the shortlist."""
    props = parameters.get("properties") or {}
    found = missing = 0
    for name in parameters.get("required") or []:
        node = props.get(name)
        if not isinstance(node, dict) or not (node.get("type") == "string" and isinstance(node.get("pattern"), str)):
            continue  # only identifiers: a number or free text says little about the tool
        if candidates(node, text):
            found += 1
        else:
            missing += 1
    return found, missing
