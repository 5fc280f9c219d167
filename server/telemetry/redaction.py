"""Personal data: one detector for the PII rails, logs, audit records and memory.

Structured identifiers are validated, not just shape-matched, so that order numbers
and timestamps are not masked: card numbers pass the Luhn check, IBANs the ISO 7064
mod-97 check, US social security numbers the SSA's never-issued ranges. The same
function masks a user's message before the model sees it and a log line before it is
written, so what is protected in one place is protected everywhere.
"""

from __future__ import annotations

import logging
import re
import traceback
from dataclasses import dataclass
from typing import Any

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b")
# Not inside an identifier: the hex of an action, call or response id ("act_4111…")
# can hold a Luhn-valid run of digits, and masking it would break the reference.
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_SSN = re.compile(r"\b(\d{3})-(\d{2})-(\d{4})\b")
# UK National Insurance number: two prefix letters (not D, F, I, Q, U, V; not O second),
# six digits, suffix A–D.
_NINO = re.compile(r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b", re.IGNORECASE)
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?![\w])")
_ADDRESS = re.compile(
    r"\b\d{1,5}[A-Za-z]? (?:[A-Z][a-z]+ ){1,3}"
    r"(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Court|Ct|Place|Pl|Way|Terrace|Close|Square|Sq)\b\.?",
)

LABELS = {
    "EMAIL": "[EMAIL]",
    "CARD": "[CARD]",
    "IBAN": "[IBAN]",
    "SSN": "[NATIONAL_ID]",
    "NINO": "[NATIONAL_ID]",
    "PHONE": "[PHONE]",
    "ADDRESS": "[ADDRESS]",
}


@dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ssn_ok(m: re.Match) -> bool:
    area, group, serial = m.groups()
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def find_pii(text: str, kinds: frozenset[str] | None = None) -> list[Span]:
    """Non-overlapping PII spans, most specific kind first."""
    found: list[Span] = []

    def add(kind: str, start: int, end: int) -> None:
        if kinds is not None and kind not in kinds:
            return
        if any(s.start < end and start < s.end for s in found):
            return
        found.append(Span(kind, start, end))

    for m in _EMAIL.finditer(text):
        add("EMAIL", m.start(), m.end())
    for m in _IBAN.finditer(text):
        if iban_ok(m.group()):
            add("IBAN", m.start(), m.end())
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            add("CARD", m.start(), m.end())
    for m in _SSN.finditer(text):
        if _ssn_ok(m):
            add("SSN", m.start(), m.end())
    for m in _NINO.finditer(text):
        add("NINO", m.start(), m.end())
    for m in _ADDRESS.finditer(text):
        add("ADDRESS", m.start(), m.end())
    for m in _PHONE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        # Phone numbers have 9–15 digits (E.164); shorter runs are order numbers, years…
        if 9 <= len(digits) <= 15 and (m.group().startswith(("+", "(")) or re.search(r"[ .-]", m.group())):
            add("PHONE", m.start(), m.end())
    return sorted(found, key=lambda s: s.start)


def mask_pii(text: str, kinds: frozenset[str] | None = None) -> tuple[str, list[str]]:
    """The text with each PII span replaced by its label, and the kinds found."""
    spans = find_pii(text, kinds)
    if not spans:
        return text, []
    out, last = [], 0
    for s in spans:
        out.append(text[last : s.start])
        out.append(LABELS[s.kind])
        last = s.end
    out.append(text[last:])
    return "".join(out), [s.kind for s in spans]


def redact_text(text: str) -> str:
    return mask_pii(text)[0]


# Argument names whose values are personal whatever they look like.
_SENSITIVE_KEYS = {"email", "phone", "name", "full_name", "address", "card", "card_number", "iban", "ssn", "password", "dob"}


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


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control(text: str) -> str:
    """The text with every non-printable character (newlines, escape sequences, bidi
    overrides) written as an escape: a client's string cannot start a log line of its
    own or rewrite what the terminal shows."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else _ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}") for ch in text
    )


class _Escaped:
    """A log argument that is neither text nor a number (an exception, a model): formatted
    as usual, then escaped and masked."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __str__(self) -> str:
        return escape_control(redact_text(str(self.value)))

    def __repr__(self) -> str:
        return escape_control(redact_text(repr(self.value)))


def _safe_arg(value: Any) -> Any:
    if isinstance(value, str):
        return escape_control(redact_text(value))
    if value is None or isinstance(value, (int, float)):
        return value  # numbers keep their type: formatters use %d on them
    return _Escaped(value)


def _traceback_lines(exc_info: Any) -> str:
    # Every line of a traceback is indented and escaped, so an exception message that
    # quotes a client's input cannot pose as a log record of its own.
    text = "".join(traceback.format_exception(*exc_info)).rstrip()
    return "\n".join("    " + escape_control(line) for line in text.splitlines())


def install_log_redaction() -> None:
    """Every log record, from any library and to any handler, is made safe when it is
    created: personal data masked, and every control character of its message and
    arguments escaped (one record is one line; tracebacks follow it indented). The
    message is formatted with its arguments, and a traceback formatted and masked with
    it (exception messages often quote the input)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "enclave_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.exc_info and record.exc_info[0] is not None or not isinstance(record.args, (tuple, dict)) or not record.args:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a broken format string must not stop logging
                message = str(record.msg)
            message = escape_control(message)
            if record.exc_info and record.exc_info[0] is not None:
                message += "\n" + _traceback_lines(record.exc_info)
                record.exc_info = None
            record.msg, record.args = redact_text(message), None
            return record
        # Arguments stay arguments, each made safe: some formatters read them by position
        # (uvicorn's access log unpacks client, method, path, version and status).
        record.msg = escape_control(redact_text(str(record.msg)))
        if isinstance(record.args, dict):
            record.args = {k: _safe_arg(v) for k, v in record.args.items()}
        else:
            record.args = tuple(_safe_arg(a) for a in record.args)
        return record

    factory.enclave_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
