"""A batch's input file, read and checked line by line (OpenAI's rules).

Each line is `{"custom_id", "method": "POST", "url", "body"}`; the url is the batch's
endpoint, custom ids are unique. A file that breaks a rule fails the whole batch with
one error per bad line (`errors.data[]`: code, message, param, line), as OpenAI's
validation does; nothing of it runs. What a line's body itself gets wrong is that
line's own 4xx answer, in the error file, as it would be for the request sent alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The endpoints a batch may run, and the scope each needs (as its route does).
ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
MAX_CUSTOM_ID = 512
MAX_REPORTED = 100  # errors listed for a bad file; the first ones tell what to fix


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as an editor shows it
    custom_id: str
    body: dict[str, Any]


def _error(code: str, message: str, line: int, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def read_lines(data: bytes, endpoint: str, max_lines: int) -> tuple[list[Line], list[dict[str, Any]]]:
    """The lines of an input file, or the errors that fail it (then no lines)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [_error("invalid_json_line", "The input file is not UTF-8 text.", 1)]
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= max_lines:
            errors.append(_error("too_many_requests", f"The input file has more than {max_lines} requests, the most one batch may hold.", number))
            break
        problem = _check(raw, number, endpoint, seen)
        if isinstance(problem, Line):
            lines.append(problem)
        else:
            errors.append(problem)
    if not lines and not errors:
        errors.append(_error("empty_file", "The input file holds no requests.", 1))
    return ([], errors[:MAX_REPORTED]) if errors else (lines, [])


def _check(raw: str, number: int, endpoint: str, seen: set[str]) -> Line | dict[str, Any]:
    try:
        item = json.loads(raw)
    except ValueError as exc:
        return _error("invalid_json_line", f"Line {number} is not valid JSON: {exc.msg}.", number)
    if not isinstance(item, dict):
        return _error("invalid_request", f"Line {number} must be a JSON object.", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error("missing_required_parameter", f"Line {number} needs a custom_id (a string).", number, "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        return _error("invalid_value", f"Line {number}: custom_id is longer than {MAX_CUSTOM_ID} characters.", number, "custom_id")
    if custom_id in seen:
        return _error("duplicate_custom_id", f"Line {number}: the custom_id {custom_id!r} is used by an earlier line; each must be unique.", number, "custom_id")
    seen.add(custom_id)
    if item.get("method") != "POST":
        return _error("invalid_method", f"Line {number}: method must be \"POST\".", number, "method")
    if item.get("url") != endpoint:
        return _error("mismatched_endpoint", f"Line {number}: url {item.get('url')!r} is not the batch's endpoint {endpoint}.", number, "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return _error("missing_required_parameter", f"Line {number} needs a body (a JSON object).", number, "body")
    return Line(number, custom_id, body)
