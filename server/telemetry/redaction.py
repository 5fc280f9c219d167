"""Redaction of personal data before anything is written to a log or audit trail."""

from __future__ import annotations

import re
from typing import Any

_PATTERNS = [
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[EMAIL]"),
    (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), "[IBAN]"),
    (re.compile(r"\b(?:\d[ -]?){13,19}\b"), "[CARD]"),
    (re.compile(r"(?<![\w-])\+?\d[\d ().-]{7,}\d\b"), "[PHONE]"),
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[SSN]"),
]
# Argument names whose values are personal whatever they look like.
_SENSITIVE_KEYS = {"email", "phone", "name", "full_name", "address", "card", "card_number", "iban", "ssn", "password", "dob"}


def redact_text(text: str) -> str:
    for pattern, label in _PATTERNS:
        text = pattern.sub(label, text)
    return text


def redact(value: Any, key: str | None = None) -> Any:
    """A copy of a JSON-like value with personal data masked."""
    if key is not None and key.lower() in _SENSITIVE_KEYS and value is not None:
        return "[REDACTED]"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
