"""What memory and knowledge cost: ingest throughput, search latency at 10k and 100k
chunks, and the TTFT a stateful turn (history + recall + retrieval) adds over a
stateless one.

    python scripts/bench_memory.py [--docs 60] [--sizes 10000 100000] [--rounds 5]

Ingest and search run in this process on the real embedding model and Chroma on disk.
For the large sizes, the index is filled with noisy copies of real chunk vectors (real
embedding of 100k chunks takes a long time on 2 cores and tells nothing more about the
index); queries are real questions, embedded per query. The TTFT part starts one server
and alternates stateless and stateful turns in the same rounds, with a third kind between
them: a stateless prompt as long as the stateful one, which splits the stateful turn's
extra TTFT into its longer prefill and the assembly of its context.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, start, stop, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.auth import ANONYMOUS
from server.db import connect, sqlite_url
from server.embedder import Embedder, packaged_model_dir
from server.memory.ingestion import IngestWorker
from server.memory.knowledge import KnowledgeBase
from server.memory.parsing import Limits
from server.memory.vectors import ChromaCollections
from tests.e2e.handbook import QUESTIONS, write_handbook

TOPICS = ["refunds", "shipping", "passwords", "invoices", "warranty", "routers", "accounts", "returns", "billing", "privacy"]


def synthetic_doc(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    parts = [f"# {topic.title()} guide {i}"]
    for s in range(6):
        parts.append(f"## Section {s}")
        parts.append(" ".join(f"Rule {i}.{s}.{k}: customers asking about {topic} get answer number {k * 7 + s} within {k + 2} days." for k in range(12)))
    return "\n\n".join(parts)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def ingest_and_search(args: argparse.Namespace, work: Path) -> None:
    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    db = connect(sqlite_url(work / "bench.db"))
    kb = KnowledgeBase(db, ChromaCollections.open(work), embedder, work / "files")
    store = kb.create_store(ANONYMOUS, "bench", None)["id"]
    files = [kb.create_file(ANONYMOUS, f"doc{i}.md", synthetic_doc(i).encode(), "assistants")["id"] for i in range(args.docs)]
    # The server's own ingestion workers (parser process, bulk embedding, indexing).
    worker = IngestWorker(db, kb, embedder, packaged_model_dir(), Limits(2000, 10_000_000, 20_000), 1800.0)
    kb.ingest = worker
    worker.start()
    t0 = time.perf_counter()
    for file_id in files:
        await kb.add_file(ANONYMOUS, store, file_id)
    while (rows := kb.list_store_files(ANONYMOUS, store)) and any(r["status"] == "in_progress" for r in rows):
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    await worker.close()
    chunks = sum(r["chunks"] for r in rows)
    print(f"ingest: {args.docs} documents, {chunks} chunks in {elapsed:.1f} s = {chunks / elapsed:.0f} chunks/s (parse, chunk, embed, index)")

    got = kb.store_chunks(ANONYMOUS.tenant, store).get(include=["embeddings"])
    base = np.asarray(got["embeddings"], dtype=np.float32)
    questions = [q for q, _, _ in QUESTIONS] + [f"How long do {t} take?" for t in TOPICS]
    rng = np.random.default_rng(0)
    # The layout before each store had its own collection, side by side: every store of
    # the tenant in one collection, a search filtered by store id.
    shared = kb.vectors.collection("bench-shared", ANONYMOUS.tenant)
    for size in args.sizes:
        filled = np.empty((size, base.shape[1]), dtype=np.float32)  # for the exact top 5
        big = kb.create_store(ANONYMOUS, f"bench-{size}", None)["id"]
        own = kb.store_chunks(ANONYMOUS.tenant, big)
        t0 = time.perf_counter()
        for start_at in range(0, size, 2000):
            n = min(2000, size - start_at)
            picks = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.05, (n, base.shape[1])).astype(np.float32)
            picks /= np.linalg.norm(picks, axis=1, keepdims=True)
            filled[start_at : start_at + n] = picks
            batch = {
                "ids": [f"{big}:x:{start_at + j}" for j in range(n)],
                "embeddings": picks,
                "documents": [f"chunk {start_at + j}" for j in range(n)],
                "metadatas": [{"vector_store_id": big, "file_id": "x", "filename": "x.md", "chunk_index": start_at + j} for j in range(n)],
            }
            own.add(**batch)
            shared.add(**batch)
        fill = time.perf_counter() - t0

        async def filtered(q: str, store_id: str) -> None:
            vector = await kb.embedder.embed_one(q)
            shared.query(query_embeddings=[vector], n_results=5, where={"vector_store_id": store_id}, include=["documents", "metadatas", "distances"])

        for q in questions[:3]:  # warm
            await kb.search(ANONYMOUS, [big], q, 5)
            await filtered(q, big)
        latencies: dict[str, list[float]] = {"own": [], "shared": []}
        recall = []
        for r in range(args.queries):
            # Each query a text not embedded before: the embedder keeps recent vectors.
            q = f"{questions[r % len(questions)]} ({size}.{r})"
            t = time.perf_counter()
            hits = await kb.search(ANONYMOUS, [big], q, 5)
            latencies["own"].append((time.perf_counter() - t) * 1000)
            # The share of the exact top 5 (by brute force) the index returned.
            fifth = np.sort(filled @ await kb.embedder.embed_one(q))[-5]
            recall.append(np.mean([h.score >= fifth - 1e-5 for h in hits]))
            t = time.perf_counter()
            await filtered(q + " ", big)
            latencies["shared"].append((time.perf_counter() - t) * 1000)
        own_ms, shared_ms = latencies["own"], latencies["shared"]
        print(f"search @ {size:>6} chunks, the store's own collection: p50 {pct(own_ms, 50):.1f} ms, p99 {pct(own_ms, 99):.1f} ms; "
              f"one shared collection filtered by store: p50 {pct(shared_ms, 50):.1f} ms, p99 {pct(shared_ms, 99):.1f} ms; "
              f"ratio own/shared p50 {pct(own_ms, 50) / pct(shared_ms, 50):.2f}, p99 {pct(own_ms, 99) / pct(shared_ms, 99):.2f}; "
              f"own collection's recall of the exact top 5 {np.mean(recall):.3f} "
              f"({args.queries} queries each, alternating, embedding included; both indexes filled in {fill:.0f} s)")
    embed_ms = []
    for r in range(args.queries):
        t = time.perf_counter()
        await kb.embedder.embed_one(f"{questions[r % len(questions)]} (embedding only {r})")
        embed_ms.append((time.perf_counter() - t) * 1000)
    print(f"query embedding alone: p50 {pct(embed_ms, 50):.1f} ms, p99 {pct(embed_ms, 99):.1f} ms")


def ttft(client: httpx.Client, path: str, body: dict) -> float:
    t0 = time.perf_counter()
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if ('"delta":{"content":"' in line and '"content":""' not in line) or '"response.output_text.delta"' in line:
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError("no text in the stream")


def padded_messages(client: httpx.Client, question: str, tokens: int) -> list[dict[str, str]]:
    """The question after a system message of filler, the whole about `tokens` long."""
    filler = "Orders ship from the central warehouse and usually arrive within five working days. "
    repeats = max(1, tokens // 15)
    for _ in range(5):
        messages = [{"role": "system", "content": filler * repeats}, {"role": "user", "content": question}]
        got = client.post("/chat/completions", json={"model": "smollm2", "messages": messages, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
        if abs(got - tokens) <= 16:
            break
        repeats = max(1, round(repeats * tokens / got))
    return messages


def turn_ttft(args: argparse.Namespace, work: Path) -> None:
    docs = write_handbook(work / "handbook")
    data = work / "server"
    port = free_port()
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    proc = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, work / "server.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc, work / "server.log")
        url = f"http://127.0.0.1:{port}/v1"
        import subprocess

        subprocess.run([sys.executable, "-m", "server.cli", "ingest", str(docs), "--store", "handbook", "--url", url], check=True, capture_output=True)
        client = httpx.Client(base_url=url, timeout=300)
        store = client.get("/vector_stores").json()["data"][0]["id"]
        client.post("/responses", json={"model": "smollm2", "input": "My name is Robin and I live in Leuven.", "max_output_tokens": 8}).raise_for_status()
        prev = None
        for i in range(6):  # a conversation with some history
            prev = client.post("/responses", json={"model": "smollm2", "input": f"Question {i} about my order.", "max_output_tokens": 16, "previous_response_id": prev}).json()["id"]
        turn = {"model": "smollm2", "previous_response_id": prev, "store": False, "temperature": 0, "tools": [{"type": "file_search", "vector_store_ids": [store], "max_num_results": 3}]}
        # Per question, a stateless prompt as long as its stateful one: what the longer
        # prefill alone costs, so that the rest is what assembling the context costs.
        padded = {q: padded_messages(client, q, client.post("/responses", json={**turn, "input": q, "max_output_tokens": 1}).json()["usage"]["input_tokens"]) for q, _, _ in QUESTIONS}
        plain, long, stateful = [], [], []
        for r in range(args.rounds):
            for q, _, _ in QUESTIONS:
                kinds = [
                    (plain, "/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": q}], "max_tokens": 4, "temperature": 0}),
                    (stateful, "/responses", {**turn, "input": q, "max_output_tokens": 4}),
                    (long, "/chat/completions", {"model": "smollm2", "messages": padded[q], "max_tokens": 4, "temperature": 0}),
                ]
                for k in ((0, 1, 2), (2, 1, 0), (1, 0, 2))[r % 3]:
                    times, path, body = kinds[k]
                    times.append(ttft(client, path, body))
        p, s, n = statistics.median(plain), statistics.median(stateful), statistics.median(long)
        print(f"TTFT p50: stateless {p:.0f} ms, with history + memory recall + retrieval (3 sources) {s:.0f} ms: "
              f"+{s - p:.0f} ms, ratio {s / p:.2f} ({len(plain)} turns each, alternating); a stateless prompt as long "
              f"as the stateful one {n:.0f} ms: the longer prefill +{n - p:.0f} ms, assembling the context +{s - n:.0f} ms")
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="enclave-bench-memory-"))
    if not args.skip_search:
        asyncio.run(ingest_and_search(args, work))
    if not args.skip_ttft:
        turn_ttft(args, work)


if __name__ == "__main__":
    main()
