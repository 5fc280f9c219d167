"""State paths and templates: `{order.item}` read from a workflow run's state."""

from __future__ import annotations

import json
from typing import Any

from server.workflows.config import PATH

_MISSING = object()


def lookup(state: dict[str, Any], path: str) -> tuple[Any, bool]:
    """(value, whether it is there) at a dotted path."""
    value: Any = state
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None, False
    return value, True


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"  # amounts: written as money is
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def render(template: str, state: dict[str, Any]) -> str:
    return PATH.sub(lambda m: _text(lookup(state, m.group(1))[0]), template)


def argument(value: Any, state: dict[str, Any]) -> Any:
    """A tool argument from state: a template that is exactly one path keeps the value's
    type; other strings are rendered; structures are filled in member by member."""
    if isinstance(value, str):
        whole = PATH.fullmatch(value)
        return lookup(state, whole.group(1))[0] if whole else render(value, state)
    if isinstance(value, dict):
        return {k: argument(v, state) for k, v in value.items()}
    if isinstance(value, list):
        return [argument(v, state) for v in value]
    return value
