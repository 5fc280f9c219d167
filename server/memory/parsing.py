"""Uploaded documents are parsed and chunked in a process of their own.

A document is hostile input: a 300 KB PDF can hold 2,000 pages or expand to hundreds of
megabytes of text, and pypdf is pure Python. Parsed in the server process it would hold
the interpreter against the event loop and could not be stopped. Here one worker process
does it under a memory cap and at a low scheduling priority; a file past its time limit
has that process killed (the next file gets a new one), and the limits on pages,
characters and chunks refuse a file with a message that names the setting.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from server.errors import InvalidRequestError
from server.memory.chunking import chunk_sections, extract_sections, too_large

# The parser's address space: enough for pypdf and the tokenizer on any file the other
# limits admit, so a decompression bomb fails the file instead of the machine.
MEMORY_CAP_BYTES = 3 * 1024**3


@dataclass(frozen=True)
class Limits:
    pages: int
    characters: int
    chunks: int


class FileRefused(Exception):
    """The file cannot be indexed: `code` and `message` become its `last_error`."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message


def _counter(tokenizer_dir: Path) -> Callable[[list[str]], list[int]]:
    """Token counts by the embedding model's own tokenizer, special tokens included, as
    the embedder counts them (server/embedder.py)."""
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return lambda texts: [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=True)] if texts else []
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return lambda texts: [len(ids) for ids in slow(texts, add_special_tokens=True)["input_ids"]] if texts else []


def parse_and_chunk(filename: str, data: bytes, limits: Limits, tokenizer_dir: str, target: int, overlap: int) -> list[str]:
    """The chunk texts of one document (runs in the parser process)."""
    try:
        sections = extract_sections(filename, data, limits.pages, limits.characters)
        chunks = chunk_sections(sections, _counter(Path(tokenizer_dir)), target, overlap)
        if len(chunks) > limits.chunks:
            raise too_large(f"makes {len(chunks)} chunks", limits.chunks, "ENCLAVE_INGEST_MAX_CHUNKS")
    except InvalidRequestError as exc:
        raise FileRefused(exc.code or "invalid_file", exc.message) from None
    except MemoryError:
        raise FileRefused("file_too_large", "the file needs more memory to read than the parser may use") from None
    except Exception as exc:  # noqa: BLE001 - any other failure on a hostile file fails that file
        raise FileRefused("invalid_file", f"the file could not be read: {type(exc).__name__}") from None
    return [c.text for c in chunks]


def _start_parser() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))
    # Background work: the kernel gives the server and the engine the cores first.
    os.nice(10)


class ParserProcess:
    """One parser process, started on first use and replaced after a kill or a crash."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the server has threads (the engine's, torch's) a fork would copy mid-flight.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_parser)
        return self._pool

    async def run(self, timeout: float, fn: Callable[..., list[str]], *args: object) -> list[str]:
        work = asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)
        try:
            return await asyncio.wait_for(work, timeout)
        except TimeoutError:
            self.kill()
            raise
        except BrokenProcessPool:
            self.kill()
            raise FileRefused("invalid_file", "the file could not be read: the parser stopped while reading it") from None

    def kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # A running call cannot be cancelled; its process is ended instead.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
