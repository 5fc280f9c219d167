"""What a large upload costs everyone else: chat TTFT while a 7 MiB text file is being
indexed, against the same server idle.

    python scripts/bench_ingest.py [--rounds 3] [--requests 15] [--megabytes 7]

One server (default model, default rails). Blocks alternate: a block of sequential
streamed chats on an idle server, then a block while a large file is being indexed (a
fresh upload each round, removed from its store after the block, which also shows that
an upload can be cancelled). Each block's TTFT p50 is paired with the other kind's in
the same round, so machine noise falls on both alike; the ratio ingesting/idle is the
figure. The file's indexing is checked to be still under way when each busy block ends.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, start, stop, wait_ready

QUESTIONS = [
    "Where is my parcel?",
    "How do I change my delivery address?",
    "Can I get a refund for a damaged item?",
    "How long does shipping take?",
    "How do I reset my password?",
]
WORDS = (
    "the refund policy applies to every order placed through the store and customers may return "
    "damaged items within thirty days of delivery for a full refund to the original payment method"
).split()


def document(megabytes: float, seed: int) -> bytes:
    """Plain prose of about `megabytes` MiB: paragraphs of sentences, as a handbook dump."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < megabytes * 1024 * 1024:
        sentences = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 25))).capitalize() + "." for _ in range(6))
        paragraph = " ".join(sentences)
        parts.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(parts).encode()


def ttft_ms(client: httpx.Client, text: str) -> float:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": 16, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with client.stream("POST", "/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return (time.perf_counter() - t0) * 1000
    return (time.perf_counter() - t0) * 1000


def block(client: httpx.Client, n: int) -> float:
    return statistics.median(ttft_ms(client, QUESTIONS[i % len(QUESTIONS)]) for i in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=15, help="sequential chats per block")
    parser.add_argument("--megabytes", type=float, default=7.0)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between blocks")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (e.g. ENCLAVE_INGEST_SHARE=1)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ENCLAVE_DATA_DIR": str(work / "data"), **dict(e.split("=", 1) for e in args.env)}
    proc = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, work / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/ready", proc, work / "server.log")
        client = httpx.Client(base_url=f"{base}/v1", timeout=300)
        block(client, 5)  # warm-up: compile caches, the rails' first passes
        store = client.post("/vector_stores", json={"name": "bench"}).json()["id"]
        data = document(args.megabytes, 0)
        print(f"document: {len(data) / 1024 / 1024:.1f} MiB; {args.rounds} rounds of {args.requests} chats per block")
        rows = []
        for round_ in range(args.rounds):
            time.sleep(args.settle)
            idle = block(client, args.requests)
            file_id = client.post("/files", files={"file": (f"handbook-{round_}.txt", data)}, data={"purpose": "assistants"}).json()["id"]
            t0 = time.perf_counter()
            queued = client.post(f"/vector_stores/{store}/files", json={"file_id": file_id}).json()
            add_ms = (time.perf_counter() - t0) * 1000
            time.sleep(args.settle)  # parsing done, embedding under way
            busy = block(client, args.requests)
            state = client.get(f"/vector_stores/{store}/files/{file_id}").json()["status"]
            client.delete(f"/vector_stores/{store}/files/{file_id}")
            client.delete(f"/files/{file_id}")
            rows.append((idle, busy, add_ms, queued["status"], state))
            print(f"round {round_ + 1}: idle p50 {idle:.0f} ms, ingesting p50 {busy:.0f} ms, ratio {busy / idle:.2f}; "
                  f"add returned {queued['status']} in {add_ms:.0f} ms; file still {state} after the block")
        ratios = [b / i for i, b, *_ in rows]
        print(f"TTFT p50 idle {statistics.median(r[0] for r in rows):.0f} ms, while ingesting {statistics.median(r[1] for r in rows):.0f} ms; "
              f"ratio ingesting/idle: median {statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
        if any(r[4] != "in_progress" for r in rows):
            print("note: the file finished before a busy block ended; use a larger --megabytes")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
