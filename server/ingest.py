"""`enclave ingest DIR --store NAME`: bulk-load documents into a running server.

It goes through the HTTP API (as any client would), so it works against one server or
a load-balanced fleet and never touches the vector files behind a running process.
Each document is named by its path relative to DIR; an unchanged file (same SHA-256) is
skipped, a changed one is uploaded again and replaces its old chunks. Files are queued
for indexing as they are uploaded (the server indexes them in the background) and the
command waits until each has completed or failed.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import httpx

from server.errors import ConfigError
from server.memory.chunking import SUPPORTED


def _check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise ConfigError(f"{response.request.method} {response.request.url.path}: {response.status_code} {message}")
    return response.json()


def ingest_directory(directory: Path, store_name: str, url: str, api_key: str | None, prune: bool = False) -> int:
    from tqdm import tqdm

    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory")
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/") + "/", headers=headers, timeout=600) as http:
        try:
            stores = _check(http.get("vector_stores"))["data"]
        except httpx.HTTPError as exc:
            raise ConfigError(f"cannot reach the server at {url}: {exc}") from None
        store = next((s for s in stores if s["name"] == store_name), None) or _check(http.post("vector_stores", json={"name": store_name}))
        present = {f["filename"]: f for f in _check(http.get(f"vector_stores/{store['id']}/files"))["data"]}
        counts = {"added": 0, "replaced": 0, "unchanged": 0, "failed": 0, "removed": 0}
        chunks = 0
        started = time.perf_counter()
        queued: dict[str, tuple[str, dict | None]] = {}  # file id -> (name, the file it replaces)
        for path in tqdm(paths, unit="file", desc=f"upload → {store_name}", file=sys.stderr):
            name = path.relative_to(directory).as_posix()
            data = path.read_bytes()
            old = present.get(name)
            if old is not None and old.get("sha256") == hashlib.sha256(data).hexdigest() and old["status"] == "completed":
                counts["unchanged"] += 1
                continue
            uploaded = _check(http.post("files", files={"file": (name, data)}, data={"purpose": "assistants"}))
            _check(http.post(f"vector_stores/{store['id']}/files", json={"file_id": uploaded["id"]}))
            queued[uploaded["id"]] = (name, old)
        bar = tqdm(total=len(queued), unit="file", desc=f"index → {store_name}", file=sys.stderr)
        while queued:
            for file_id, (name, old) in list(queued.items()):
                state = _check(http.get(f"vector_stores/{store['id']}/files/{file_id}"))
                if state["status"] == "in_progress":
                    continue
                del queued[file_id]
                bar.update(1)
                if state["status"] != "completed":
                    counts["failed"] += 1
                    bar.write(f"failed: {name}: {(state.get('last_error') or {}).get('message')}")
                    continue
                chunks += state.get("chunks", 0)
                counts["replaced" if old else "added"] += 1
                if old is not None:
                    http.delete(f"files/{old['id']}")  # the server already dropped its chunks
                bar.set_postfix(chunks=chunks)
            if queued:
                time.sleep(0.25)
        bar.close()
        if prune:
            wanted = {p.relative_to(directory).as_posix() for p in paths}
            for name, old in present.items():
                if name not in wanted:
                    _check(http.delete(f"files/{old['id']}"))
                    counts["removed"] += 1
        elapsed = time.perf_counter() - started
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    print(f"{store['id']} ({store_name}): {summary}; {chunks} chunks in {elapsed:.1f} s ({chunks / elapsed if elapsed else 0:.0f} chunks/s)")
    return 1 if counts["failed"] else 0
