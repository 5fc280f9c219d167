"""A small support handbook in the four ingestible formats, with questions whose answer
sits in one known chunk."""

from __future__ import annotations

import zlib
from pathlib import Path

REFUNDS_MD = """# Refund policy

Refunds cover orders placed in our web shop and in the mobile app.

## Timelines

Approved refunds reach the original payment method within 14 days. Bank transfers can take
two more business days. We email a confirmation when the refund is sent.

## Exceptions

Gift cards are never refundable and cannot be exchanged for cash. Opened software licences
cannot be returned once the key has been revealed.
"""

SHIPPING_HTML = """<html><head><title>Shipping</title><style>p {color: red}</style></head><body>
<nav>Home | Help</nav>
<h1>Shipping</h1>
<h2>Delivery times</h2>
<p>Standard parcels leave our Antwerp warehouse within 2 business days of payment.</p>
<p>Express parcels placed before noon leave the same day.</p>
<h2>International orders</h2>
<p>Orders outside the European Union ship with an express courier, and customs duties and import
taxes are paid by the recipient on delivery.</p>
</body></html>
"""

SECURITY_TXT = """Account security

To reset your password, open Settings, choose Security and press Send reset link. The reset link
expires after 30 minutes.

Two-factor authentication can use an authenticator app or a hardware key. Text messages are not
offered because they can be intercepted.
"""

WARRANTY_LINES = [
    "Warranty terms.",
    "Every Enclave Router carries a three year hardware warranty from the date of purchase.",
    "Batteries are covered for twelve months. Water damage is not covered.",
]

QUESTIONS = [
    ("How long until an approved refund arrives on my card?", "refunds.md", "14 days"),
    ("Can I get cash back for a gift card?", "refunds.md", "Gift cards are never refundable"),
    ("Who pays customs duties on international orders?", "shipping.html", "customs duties"),
    ("When does a standard parcel leave the warehouse?", "shipping.html", "2 business days"),
    ("How do I reset my password?", "security.txt", "Send reset link"),
    ("How long is the router hardware warranty?", "warranty.pdf", "three year hardware warranty"),
]


def tiny_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with text in Helvetica, written by hand (no PDF writer needed)."""
    text = " ".join(f"({line}) '" for line in lines)
    content = f"BT /F1 11 Tf 14 TL 72 720 Td {text} ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def _pdf(objects: list[bytes]) -> bytes:
    out = b"%PDF-1.4\n"
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def _stream(data: bytes) -> bytes:
    packed = zlib.compress(data, 9)
    return f"<< /Length {len(packed)} /Filter /FlateDecode >>\nstream\n".encode() + packed + b"\nendstream"


def many_pages_pdf(pages: int, lines_per_page: int = 1) -> bytes:
    """A small PDF of many pages that all show one compressed content stream: a few
    hundred kilobytes that read as `pages` times the text (hostile input for ingestion)."""
    text = " ".join(f"(Line {i} of the same page text repeated on every page.) '" for i in range(lines_per_page))
    kids = " ".join(f"{4 + i} 0 R" for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    content = 4 + pages
    objects += [
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R /Resources << /Font << /F1 3 0 R >> >> >>".encode()
        for _ in range(pages)
    ]
    objects.append(_stream(f"BT /F1 11 Tf 14 TL 72 720 Td {text} ET".encode()))
    return _pdf(objects)


def deep_page_tree_pdf(depth: int = 120) -> bytes:
    """One page under `depth` nested page-tree nodes: past pypdf's own limit on page tree
    depth, which it refuses with LimitReachedError."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    for level in range(depth):
        objects.append(f"<< /Type /Pages /Kids [{level + 3} 0 R] /Count 1 >>".encode())
    objects.append(b"<< /Type /Page /MediaBox [0 0 612 792] >>")
    return _pdf(objects)


def write_handbook(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "refunds.md").write_text(REFUNDS_MD)
    (directory / "shipping.html").write_text(SHIPPING_HTML)
    (directory / "security.txt").write_text(SECURITY_TXT)
    (directory / "warranty.pdf").write_bytes(tiny_pdf(WARRANTY_LINES))
    return directory
