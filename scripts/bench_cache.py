"""What the response cache saves: end-to-end latency of a chat completion answered from
the cache (exact and semantic hits) against one the model answers, with and without the
cache's lookup and store on the way.

    python scripts/bench_cache.py [--rounds 3] [--max-tokens 32] [--rails false]

One server (the support deployment, every default rail on, `response_cache` mode "on"
at similarity 0.9). Each round, in an order that rotates: `off` asks in a new context
with `"cache": false` (no lookup, nothing kept), `miss` asks in a new context with the
cache on (lookup, generation, store), `exact` repeats questions kept earlier, `semantic` asks
paraphrases of them (each pair's cosine similarity is printed). Latency is measured by
the client, request sent to body read, non-streamed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, start, stop, wait_ready

SYSTEM = "You are the customer support assistant of Acme. Answer briefly and politely."
MODEL = "smollm2"
# A question and a paraphrase of it, as customers write them.
PAIRS = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is your refund policy?", "What is the refund policy?"),
    ("What are your opening hours?", "What are your opening hours, please?"),
    ("How long does delivery take?", "How long does the delivery take?"),
    ("Do you ship to Portugal?", "Can you ship to Portugal?"),
    ("How do I change my delivery address?", "How can I change my delivery address?"),
    ("Can I cancel my subscription?", "Can I cancel my subscription online?"),
    ("How do I return an item?", "How can I return an item?"),
    ("Where can I find my invoice?", "Where do I find my invoice?"),
    ("Which payment methods do you accept?", "What payment methods do you accept?"),
]
FRESH = [
    "How do I update my billing details",
    "Can I order a gift card",
    "Do you offer student discounts",
    "How do I contact support by phone",
    "Can I pick up my order in a store",
    "Is there a warranty on electronics",
]


def ask(client: httpx.Client, text: str, cache: object, max_tokens: int, system: str = SYSTEM) -> tuple[float, dict]:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # every generated answer the same length, so off and miss compare
        "cache": cache,
    }
    t0 = time.perf_counter()
    r = client.post("/chat/completions", json=body)
    ms = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    return ms, r.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each timed block")
    parser.add_argument("--rails", choices=("true", "false"), default="true", help="false: what a hit costs without the input rails")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="enclave-bench-cache-"))
    port = free_port()
    env = {
        **os.environ,
        "ENCLAVE_DATA_DIR": str(work / "data"),
        "HF_HUB_OFFLINE": "1",
        "ENCLAVE_DEPLOYMENT": "support",
        "ENCLAVE_RESPONSE_CACHE": '{"mode": "on", "similarity": 0.9}',
        "ENCLAVE_RAILS": args.rails,
    }
    proc = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, work / "server.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc, work / "server.log")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=300)
        for q, _ in PAIRS:  # kept once: the hits' entries (and the rails' lazy parts warmed)
            _, out = ask(client, q, True, args.max_tokens)
            assert out.get("cache", {}).get("stored"), f"not kept: {q!r} {out.get('cache')} {out['choices'][0]['finish_reason']}"
        times: dict[str, list[float]] = {"off": [], "miss": [], "exact": [], "semantic": []}
        similarity: list[float] = []
        serial = 0
        kinds = list(times)
        for r in range(args.rounds):
            for kind in kinds[r % 4 :] + kinds[: r % 4]:
                time.sleep(args.settle)
                for i, (q, p) in enumerate(PAIRS):
                    if kind in ("off", "miss"):
                        # A context never seen (the session's own line in the system
                        # prompt) makes a miss that still pays the whole lookup.
                        serial += 1
                        system = f"{SYSTEM} Session {serial}."
                        ms, out = ask(client, FRESH[i % len(FRESH)] + "?", kind == "miss", args.max_tokens, system)
                        assert (out.get("cache") or {}).get("status", "miss") == "miss", out.get("cache")
                    else:
                        ms, out = ask(client, q if kind == "exact" else p, True, args.max_tokens)
                        got = out.get("cache") or {}
                        assert got.get("status") == "hit" and got.get("kind") == kind, (kind, q, got)
                        if kind == "semantic" and r == 0:
                            similarity.append(got["similarity"])
                    times[kind].append(ms)

        def p(v: list[float], q: float) -> float:
            return sorted(v)[min(len(v) - 1, int(q * len(v)))]

        base = statistics.median(times["off"])
        print(f"end-to-end latency, rails {'on' if args.rails == 'true' else 'off'}, {len(times['off'])} requests each ({args.max_tokens} tokens when generated):")
        for kind, v in times.items():
            med = statistics.median(v)
            print(f"  {kind:<9} p50 {med:8.1f} ms   p95 {p(v, 0.95):8.1f} ms   p50 ratio to off {med / base:.4f}")
        print(f"  lookup and store on a miss: {statistics.median(times['miss']) - base:+.1f} ms at p50")
        print(f"  semantic pairs' similarity: min {min(similarity):.3f}, median {statistics.median(similarity):.3f}")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
