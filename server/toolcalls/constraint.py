"""Tool schemas and response formats → one regular expression the engine enforces token
by token (vLLM's xgrammar backend by default; outlines and guidance take the same regex).

The regex is built here, once per tool set (LRU), rather than by the engine, because here
we can:

* name the tool whose schema cannot be compiled (a 400, not an engine failure);
* enforce numeric bounds, which outlines-core's JSON-schema translator ignores: a
  bounded integer/number is swapped for a placeholder and then for a range regex;
* join several tools, parallel calls and, for `tool_choice: auto`, free text into one
  automaton, so the model decides between answering and calling in a single pass.

What the model writes when it calls tools (the same on every model and chat template):

    [{"name": "lookup_ticket", "arguments": {"ticket_id": "T-1001"}}]
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from outlines_core import json_schema as outlines_schema

from server.errors import InvalidRequestError

WHITESPACE = r"[ ]?"
# Free text for `auto`: anything that does not open a call array, nor open a call written
# as text, which small models do when tools are offered (a bare JSON object, a code fence,
# `<tool_call>` tags): a client would show it as the answer. Leading whitespace is excluded
# so a call cannot hide behind a newline.
TEXT = r"[^\[\s{<`][\s\S]*"
_PLACEHOLDER = "ENCLAVERANGE{}"

# Depth-limited "any JSON object" (response_format json_object, open tool parameters):
# Outlines compiles schemas to automata and an unbounded recursive object never finishes.
_PRIMITIVES: list[dict[str, Any]] = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
_ANY_VALUE = {"anyOf": _PRIMITIVES + [{"type": "array", "items": {"anyOf": _PRIMITIVES}}, {"type": "object", "additionalProperties": {"anyOf": _PRIMITIVES}}]}
ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": _ANY_VALUE}


# ---------------------------------------------------------------- numeric ranges


def _digits_range(lo: str, hi: str) -> list[str]:
    """Regexes matching the decimal strings of equal length between lo and hi."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [lo[0] + r for r in _digits_range(lo[1:], hi[1:])]
    out: list[str] = []
    n = len(lo) - 1
    lo_rest, hi_rest = lo[1:], hi[1:]
    start, end = int(lo[0]), int(hi[0])
    if lo_rest != "0" * n:
        out += [lo[0] + r for r in _digits_range(lo_rest, "9" * n)]
        start += 1
    if hi_rest != "9" * n:
        tail = [hi[0] + r for r in _digits_range("0" * n, hi_rest)]
        end -= 1
    else:
        tail = []
    if start <= end:
        first = str(start) if start == end else f"[{start}-{end}]"
        out.append(first + f"[0-9]{{{n}}}")
    return out + tail


def _nonneg_range(lo: int, hi: int | None) -> list[str]:
    """Alternatives matching canonical decimal integers in [lo, hi] (hi None: unbounded)."""
    out: list[str] = []
    top = hi if hi is not None else 10 ** len(str(lo)) - 1
    for width in range(len(str(lo)), len(str(top)) + 1):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = min(top, 10**width - 1)
        if a <= b:
            out += _digits_range(str(a), str(b))
    if hi is None:
        out.append(f"[1-9][0-9]{{{len(str(lo))},}}")
    return out


def integer_regex(lo: int | None, hi: int | None) -> str:
    """A regex for the JSON integers in [lo, hi]; None leaves that side open."""
    parts: list[str] = []
    if lo is None or lo < 0:
        # Negative side: -m for m in [max(1, -hi), -lo].
        m_lo = 1 if hi is None or hi >= 0 else -hi
        m_hi = None if lo is None else -lo
        if m_hi is None or m_lo <= m_hi:
            parts += ["-(?:" + "|".join(_nonneg_range(m_lo, m_hi)) + ")"]
    if hi is None or hi >= 0:
        parts += _nonneg_range(max(lo or 0, 0), hi)
    if not parts:
        raise ValueError("empty range")
    return "(?:" + "|".join(parts) + ")"


def number_regex(lo: float | None, hi: float | None) -> str:
    """A regex for JSON numbers in [lo, hi]. Conservative on purpose: every match is in
    range, but fractions are only offered where they cannot cross a bound (non-negative
    values strictly below an integer upper bound)."""
    ilo = None if lo is None else math.ceil(lo)
    ihi = None if hi is None else math.floor(hi)
    parts: list[str] = []
    if ilo is None or ilo < 0:
        neg_hi = -1 if ihi is None else min(ihi, -1)
        if ilo is None or ilo <= neg_hi:
            parts.append(integer_regex(ilo, neg_hi))
    start = max(ilo or 0, 0)
    if ihi is None:
        parts.append(integer_regex(start, None) + r"(?:\.[0-9]+)?")
    elif start <= ihi:
        if start <= ihi - 1:
            parts.append(integer_regex(start, ihi - 1) + r"(?:\.[0-9]+)?")
        parts.append(integer_regex(ihi, ihi))
    if not parts:
        raise ValueError("empty range")
    return "(?:" + "|".join(parts) + ")"


def _bounds(node: dict[str, Any], integral: bool) -> tuple[float | None, float | None]:
    lo, hi = node.get("minimum"), node.get("maximum")
    xlo, xhi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    step = 1 if integral else 1e-9
    if isinstance(xlo, (int, float)) and not isinstance(xlo, bool):
        lo = xlo + step if lo is None else max(lo, xlo + step)
    if isinstance(xhi, (int, float)) and not isinstance(xhi, bool):
        hi = xhi - step if hi is None else min(hi, xhi - step)
    return lo, hi


# ---------------------------------------------------------------- schema → regex


def _prepare(schema: Any, ranges: list[str]) -> Any:
    """Copy of `schema` with numeric bounds swapped for placeholders and open objects
    depth-limited, so outlines-core can translate it and the result stays compilable."""
    if isinstance(schema, list):
        return [_prepare(s, ranges) for s in schema]
    if not isinstance(schema, dict):
        return schema
    node = {k: _prepare(v, ranges) for k, v in schema.items() if k not in ("$defs", "definitions")}
    for key in ("$defs", "definitions"):
        if key in schema:
            node[key] = {k: _prepare(v, ranges) for k, v in schema[key].items()}
    kind = node.get("type")
    if kind in ("integer", "number") and any(k in node for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        lo, hi = _bounds(node, kind == "integer")
        if kind == "integer":
            regex = integer_regex(None if lo is None else math.ceil(lo), None if hi is None else math.floor(hi))
        else:
            regex = number_regex(lo, hi)
        ranges.append(regex)
        return {"const": _PLACEHOLDER.format(len(ranges) - 1)}
    if kind == "object" and "properties" not in node and node.get("additionalProperties", True) is True:
        # A fully open object ("any keys, any values") does not compile; bound its depth.
        return copy.deepcopy(ANY_OBJECT) | {k: v for k, v in node.items() if k in ("description", "title")}
    return node


# Compile cost is bounded by design, not by a clock: vLLM's wall-clock limit on regex
# compiles is switched off (VllmEngine.load), because on a busy machine it turned valid
# schemas into 400s at random. What can make a compile blow up is refused here instead,
# the same way on every machine: an over-long constraint (compile time grows with the
# automaton, which grows with the regex), and the `pattern`s whose automata explode
# (nested quantifiers; large counted repetitions).
MAX_REGEX_CHARS = 200_000
MAX_PATTERN_CHARS = 512
MAX_PATTERN_REPEAT = 64


def _check_pattern(pattern: str) -> None:
    import re._parser as sre_parse  # the stdlib's own regex parser

    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a `pattern` is longer than {MAX_PATTERN_CHARS} characters")
    try:
        parsed = sre_parse.parse(pattern)
    except Exception as exc:  # noqa: BLE001 - re.error and friends
        raise ValueError(f"a `pattern` is not a valid regular expression: {exc}") from None
    repeats = (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None))

    def walk(items: Any, inside_repeat: bool) -> None:
        for op, arg in items:
            if op in repeats:
                low, high, body = arg
                bound = low if high == sre_parse.MAXREPEAT else high
                if bound > MAX_PATTERN_REPEAT:
                    raise ValueError(f"a `pattern` repeats more than {MAX_PATTERN_REPEAT} times; use maxLength instead")
                if inside_repeat:
                    raise ValueError("a `pattern` nests one quantifier inside another")
                walk(body, True)
            elif op == sre_parse.SUBPATTERN:
                walk(arg[-1], inside_repeat)
            elif op == sre_parse.BRANCH:
                for branch in arg[1]:
                    walk(branch, inside_repeat)

    walk(parsed, False)


def check_patterns(schema: Any) -> None:
    """ValueError for a `pattern` anywhere in `schema` whose automaton could explode."""
    if isinstance(schema, list):
        for item in schema:
            check_patterns(item)
    elif isinstance(schema, dict):
        for key, value in schema.items():
            if key == "pattern" and isinstance(value, str):
                _check_pattern(value)
            else:
                check_patterns(value)


def schema_regex(schema: dict[str, Any]) -> str:
    """The regex for one JSON schema; ValueError when it cannot be compiled."""
    check_patterns(schema)
    ranges: list[str] = []
    prepared = _prepare(schema, ranges)
    regex = outlines_schema.build_regex_from_schema(json.dumps(prepared), WHITESPACE)
    for i, sub in enumerate(ranges):
        token = f'"{_PLACEHOLDER.format(i)}"'
        if token not in regex:
            raise ValueError("numeric bound could not be applied")
        regex = regex.replace(token, sub)
    _check_buildable(regex)
    return regex


def _check_buildable(regex: str) -> None:
    # The same checks vLLM runs when the request is added, here so the error names a tool.
    try:
        from vllm.v1.structured_output.backend_outlines import (
            validate_regex_is_buildable,
        )
    except ImportError:  # engines without vLLM (remote, scripted): nothing further to check
        return
    try:
        validate_regex_is_buildable(regex)
    except Exception as exc:  # noqa: BLE001 - VLLMValidationError, whatever its base
        raise ValueError(str(exc).split("\n")[0]) from None


def _escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?{}[]\|()" else c for c in text)


@dataclass(frozen=True)
class ToolConstraint:
    """The compiled choice for one request step."""

    regex: str


@lru_cache(maxsize=512)
def _schema_regex_cached(schema_json: str) -> str:
    return schema_regex(json.loads(schema_json))


def _compiled(schema: dict[str, Any], what: str, param: str, code: str) -> str:
    """`schema_regex`, cached by the schema's text (key order kept: it is the order the
    output's keys must follow), with a 400 naming `what` on failure."""
    try:
        return _schema_regex_cached(json.dumps(schema))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise InvalidRequestError(f"{what} cannot be compiled into an output constraint: {exc}", param=param, code=code) from None


def _within_limit(regex: str, what: str, param: str, code: str) -> str:
    if len(regex) > MAX_REGEX_CHARS:
        raise InvalidRequestError(
            f"{what} make an output constraint of {len(regex):,} characters, over the limit of {MAX_REGEX_CHARS:,}", param=param, code=code
        )
    return regex


def response_format_regex(schema: dict[str, Any]) -> str:
    """The regex for a `response_format` JSON schema. Engines are sent this rather than
    the schema, so every structured-output backend enforces the same language as for tool
    calls: compact JSON (free whitespace lets small models emit newlines until
    max_tokens), numeric bounds, depth-limited open objects."""
    regex = _compiled(schema, "response_format: the JSON schema", "response_format", "invalid_json_schema")
    return _within_limit(regex, "response_format: the JSON schema's rules", "response_format", "invalid_json_schema")


def tool_call_regex(name: str, parameters: dict[str, Any]) -> str:
    """Regex for one call object of tool `name`; a 400 that names the tool on failure."""
    args = _compiled(parameters, f"tool `{name}`: its parameters schema", "tools", "invalid_tool_schema")
    ws = WHITESPACE
    return rf'\{{{ws}"name"{ws}:{ws}"{_escape(name)}"{ws},{ws}"arguments"{ws}:{ws}{args}{ws}\}}'


def build_constraint(tools: list[tuple[str, dict[str, Any]]], *, allow_text: bool, parallel: bool) -> ToolConstraint:
    """One regex for a step: a JSON array of calls to any of `tools` (one call unless
    `parallel`), or, when `allow_text`, free text instead."""
    one = "(?:" + "|".join(tool_call_regex(n, p) for n, p in tools) + ")"
    ws = WHITESPACE
    calls = rf"\[{ws}{one}(?:{ws},{ws}{one})*{ws}\]" if parallel else rf"\[{ws}{one}{ws}\]"
    regex = f"(?:{calls})|(?:{TEXT})" if allow_text else calls
    return ToolConstraint(_within_limit(regex, "the tools' parameter schemas (send fewer tools or smaller schemas)", "tools", "invalid_tool_schema"))
