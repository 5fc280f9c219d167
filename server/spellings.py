"""Every string a finite regular expression matches: to prove, when the decline policy is
loaded, that a decline pattern cannot match anything a generation with its phrases ruled
out could write (server/declines.py)."""

from __future__ import annotations

import re
import re._parser as sre  # the standard library's own parser: the patterns are plain `re` syntax
from typing import Any

# Beyond this many strings a pattern is treated as open (as one with `+` or `*` is).
LIMIT = 10_000


class _Open(Exception):
    pass


def spellings(pattern: str) -> set[str] | None:
    """The strings `pattern` matches, anchors (\\b, ^, $) and lookarounds read as
    matching nothing; None when they are unbounded, too many, or use syntax read here
    as open (a class such as \\w, a back reference)."""
    try:
        return _expand(sre.parse(pattern))
    except (_Open, re.error):
        return None


def _expand(items: Any) -> set[str]:
    out = {""}
    for op, arg in items:
        if op is sre.LITERAL:
            options = {chr(arg)}
        elif op is sre.IN:
            if not all(o is sre.LITERAL for o, _ in arg):
                raise _Open  # a range or a category: too many to list
            options = {chr(a) for _, a in arg}
        elif op is sre.SUBPATTERN:
            options = _expand(arg[-1])
        elif op is sre.BRANCH:
            options = set().union(*(_expand(b) for b in arg[1]))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = arg
            if high is sre.MAXREPEAT or high > 8:
                raise _Open
            one, layer, options = _expand(body), {""}, set()
            for n in range(high + 1):
                if n >= low:
                    options |= layer
                layer = {a + b for a in layer for b in one}
        elif op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
            options = {""}
        else:
            raise _Open
        out = {a + b for a in out for b in options}
        if len(out) > LIMIT:
            raise _Open
    return out
