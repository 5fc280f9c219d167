"""Documents → sections → chunks.

Markdown, plain text, HTML and PDF become sections (a heading path and its paragraphs);
a chunk never crosses a section, breaks between sentences, and overlaps its neighbour by
the last sentences that fit in `overlap` tokens, so a fact on a boundary is whole in one
chunk. Each chunk starts with its heading path: "Refunds > Timelines" is what makes a
short paragraph findable by a question that names the topic but not the words.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath

from server.errors import InvalidRequestError

SUPPORTED = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text", ".html": "html", ".htm": "html", ".pdf": "pdf"}

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
# A sentence ends at . ! ? (optionally closed by a quote or bracket) before whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+")


@dataclass
class Section:
    headings: tuple[str, ...]
    paragraphs: list[str]


@dataclass
class Chunk:
    index: int
    text: str
    heading: str
    tokens: int


def document_kind(filename: str) -> str:
    kind = SUPPORTED.get(PurePath(filename).suffix.lower())
    if kind is None:
        raise InvalidRequestError(
            f"unsupported file type for {filename!r}: use one of {', '.join(sorted(SUPPORTED))}", param="file", code="unsupported_file"
        )
    return kind


def too_large(what: str, limit: int, setting: str) -> InvalidRequestError:
    return InvalidRequestError(f"the file {what}; the limit is {limit} ({setting})", param="file", code="file_too_large")


def extract_sections(filename: str, data: bytes, max_pages: int | None = None, max_characters: int | None = None) -> list[Section]:
    """The document's sections; a file over `max_pages` (PDF) or `max_characters` of
    text is refused as soon as that is known, before the rest is read."""
    kind = document_kind(filename)
    if kind == "pdf":
        text = _pdf_text(data, max_pages, max_characters)
        return _markdown_sections(text, headings=False)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    if max_characters is not None and len(text) > max_characters:
        raise too_large(f"has {len(text)} characters", max_characters, "ENCLAVE_INGEST_MAX_CHARACTERS")
    if kind == "html":
        text = _html_to_markdown(text)
    return _markdown_sections(text, headings=kind != "text")


def _pdf_text(data: bytes, max_pages: int | None = None, max_characters: int | None = None) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    pages: list[str] = []
    size = 0
    try:
        reader = PdfReader(io.BytesIO(data))
        if max_pages is not None and len(reader.pages) > max_pages:
            raise too_large(f"has {len(reader.pages)} pages", max_pages, "ENCLAVE_INGEST_MAX_PAGES")
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            size += len(pages[-1])
            # A small PDF can expand to far more text than its size suggests.
            if max_characters is not None and size > max_characters:
                raise too_large(f"holds more than {max_characters} characters of text", max_characters, "ENCLAVE_INGEST_MAX_CHARACTERS")
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        # pypdf's own refusals (LimitReachedError among them) and what malformed
        # structures make it raise.
        raise InvalidRequestError(f"the PDF could not be read: {type(exc).__name__}", param="file", code="invalid_file") from None
    return "\n\n".join(pages)


def _html_to_markdown(html: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "nav", "header", "footer", "noscript"]):
        tag.decompose()
    lines: list[str] = []
    for el in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td", "blockquote"]):
        # Only leaf-level blocks: a <li> holding a <p> is written once, by the <p>.
        if el.name in ("li", "td", "blockquote") and el.find(["p", "li", "pre"]):
            continue
        text = " ".join(el.get_text(" ").split())
        if not text:
            continue
        if el.name[0] == "h" and el.name[1:].isdigit():
            lines.append("#" * int(el.name[1]) + " " + text)
        else:
            lines.append(text)
        lines.append("")
    return "\n".join(lines)


def _markdown_sections(text: str, headings: bool) -> list[Section]:
    sections = [Section((), [])]
    path: list[tuple[int, str]] = []
    paragraph: list[str] = []
    fenced = False

    def flush() -> None:
        if paragraph:
            sections[-1].paragraphs.append(" ".join(line.strip() for line in paragraph))
            paragraph.clear()

    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        match = _HEADING.match(line) if headings and not fenced else None
        if match:
            flush()
            level = len(match.group(1))
            path = [(lvl, h) for lvl, h in path if lvl < level] + [(level, match.group(2))]
            sections.append(Section(tuple(h for _, h in path), []))
        elif not line.strip() or re.match(r"^\s*([-*+]|\d+[.)])\s+", line):
            # A blank line ends a paragraph; so does a list item (each item stands alone).
            flush()
            if line.strip():
                paragraph.append(re.sub(r"^\s*([-*+]|\d+[.)])\s+", "", line))
        else:
            paragraph.append(line)
    flush()
    return [s for s in sections if s.paragraphs]


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def chunk_sections(
    sections: list[Section], count_tokens: Callable[[list[str]], list[int]], target: int = 200, overlap: int = 40
) -> list[Chunk]:
    """Pack sentences into chunks of at most `target` tokens (a longer sentence is cut
    on words), within each section, carrying `overlap` tokens of trailing sentences."""
    chunks: list[Chunk] = []
    for section in sections:
        heading = " > ".join(section.headings)
        head_tokens = count_tokens([heading])[0] if heading else 0
        budget = max(target - head_tokens, 32)
        sentences: list[str] = []
        for para in section.paragraphs:
            sentences.extend(split_sentences(para))
        sizes = count_tokens(sentences) if sentences else []
        pieces: list[tuple[str, int]] = []
        for sentence, size in zip(sentences, sizes):
            if size <= budget:
                pieces.append((sentence, size))
                continue
            words = sentence.split()
            step = max(1, int(len(words) * budget / size))
            for i in range(0, len(words), step):
                part = " ".join(words[i : i + step])
                pieces.append((part, count_tokens([part])[0]))
        current: list[tuple[str, int]] = []
        used = 0
        for piece in pieces:
            if current and used + piece[1] > budget:
                _emit(chunks, heading, current, head_tokens)
                carried: list[tuple[str, int]] = []
                carried_tokens = 0
                for prev in reversed(current):
                    if carried_tokens + prev[1] > overlap or carried_tokens + prev[1] + piece[1] > budget:
                        break
                    carried.insert(0, prev)
                    carried_tokens += prev[1]
                current, used = carried, carried_tokens
            current.append(piece)
            used += piece[1]
        if current:
            _emit(chunks, heading, current, head_tokens)
    return chunks


def _emit(chunks: list[Chunk], heading: str, pieces: list[tuple[str, int]], head_tokens: int) -> None:
    body = " ".join(text for text, _ in pieces)
    text = f"{heading}\n{body}" if heading else body
    chunks.append(Chunk(len(chunks), text, heading, head_tokens + sum(n for _, n in pieces)))
