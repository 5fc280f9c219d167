"""Interactive latency while a batch runs, side by side with idle, in one run.

One `enclave serve` of the support deployment on the real engine (rails on). A user
sends streamed chat requests one after another (a short pause between them), and their
time to first token (TTFT) and whole latency are measured in three conditions, in
alternating rounds:

* idle: nothing else runs;
* batch: a batch of chat lines runs through /v1/batches (the worker starts no line
  while an interactive request is in flight, and runs one at a time for a while after);
* load: for comparison, the same lines sent as ordinary requests by four clients at
  once, which is what a batch without the worker's priority would be.

Also printed: the batch's throughput (lines per second) while the user is active.

    python scripts/bench_batches.py --requests 12 --rounds 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import free_port, start, stop, wait_ready

QUESTIONS = ["What are your opening hours?", "How do I reset my password?", "Do you ship to Norway?", "How long does delivery take?"]
PAUSE_S = 0.5  # between the user's requests


def interactive(client: httpx.Client, served: str, n: int) -> tuple[list[float], list[float]]:
    ttfts, totals = [], []
    for i in range(n):
        body = {"model": served, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": 16, "temperature": 0, "stream": True}
        started = time.perf_counter()
        first = None
        with client.stream("POST", "/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if first is None and line.startswith("data: ") and '"content"' in line:
                    first = time.perf_counter() - started
        totals.append(time.perf_counter() - started)
        ttfts.append(first if first is not None else totals[-1])
        time.sleep(PAUSE_S)
    return ttfts, totals


def line_body(served: str, i: int) -> dict:
    return {"model": served, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}], "max_tokens": 32, "temperature": 0}


def submit_batch(client: httpx.Client, served: str, lines: int) -> str:
    data = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": line_body(served, i)}) + "\n" for i in range(lines))
    up = client.post("/files", files={"file": ("bench.jsonl", io.BytesIO(data.encode()))}, data={"purpose": "batch"})
    up.raise_for_status()
    r = client.post("/batches", json={"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    r.raise_for_status()
    batch_id = r.json()["id"]
    while client.get(f"/batches/{batch_id}").json()["request_counts"]["completed"] < 4:  # running at full concurrency
        time.sleep(0.2)
    return batch_id


def finish_batch(client: httpx.Client, batch_id: str) -> None:
    client.post(f"/batches/{batch_id}/cancel")
    while client.get(f"/batches/{batch_id}").json()["status"] not in ("cancelled", "completed"):
        time.sleep(0.2)


def with_load(client: httpx.Client, served: str, run) -> tuple[list[float], list[float]]:
    stopping = threading.Event()

    def loader(k: int) -> None:
        i = k
        while not stopping.is_set():
            client.post("/chat/completions", json=line_body(served, i))
            i += 4

    threads = [threading.Thread(target=loader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    try:
        return run()
    finally:
        stopping.set()
        for t in threads:
            t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12, help="interactive requests per condition and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lines", type=int, default=400, help="lines of each round's batch (it is cancelled once measured)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "ENCLAVE_DEPLOYMENT": "support", "ENCLAVE_DATA_DIR": str(work / "data")}
        made = subprocess.run(
            [sys.executable, "-m", "server.cli", "keys", "create", "--tenant", "acme", "--user", "bench", "--scope", "*"], env=env, capture_output=True, text=True, check=True
        )
        key = json.loads(made.stdout)["key"]
        port = free_port()
        proc = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, work / "server.log")
        try:
            wait_ready(f"http://127.0.0.1:{port}/ready", proc, work / "server.log")
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=600)
            served = client.get("/models").json()["data"][0]["id"]
            interactive(client, served, 4)  # warm-up
            ttft: dict[str, list[float]] = {"idle": [], "batch": [], "load": []}
            total: dict[str, list[float]] = {k: [] for k in ttft}
            rates: list[float] = []
            for r in range(args.rounds):
                for mode in (("idle", "batch", "load") if r % 2 == 0 else ("load", "batch", "idle")):
                    if mode == "idle":
                        t, w = interactive(client, served, args.requests)
                    elif mode == "load":
                        t, w = with_load(client, served, lambda: interactive(client, served, args.requests))
                    else:
                        batch_id = submit_batch(client, served, args.lines)
                        before = client.get(f"/batches/{batch_id}").json()["request_counts"]["completed"]
                        began = time.perf_counter()
                        t, w = interactive(client, served, args.requests)
                        done = client.get(f"/batches/{batch_id}").json()["request_counts"]["completed"] - before
                        rates.append(done / (time.perf_counter() - began))
                        finish_batch(client, batch_id)
                    ttft[mode] += t
                    total[mode] += w
        finally:
            stop(proc)
    print(f"interactive requests per condition: {len(ttft['idle'])}; streamed, max_tokens 16; batch and load lines max_tokens 32; real engine, rails on")
    base_ttft, base_total = statistics.median(ttft["idle"]), statistics.median(total["idle"])
    for mode, firsts in ttft.items():
        p50t, p50w = statistics.median(firsts), statistics.median(total[mode])
        print(
            f"{mode:6s} TTFT p50 {p50t * 1000:7.1f} ms (ratio {p50t / base_ttft:.2f})  p90 {sorted(firsts)[int(0.9 * (len(firsts) - 1))] * 1000:7.1f} ms"
            f"  latency p50 {p50w * 1000:7.1f} ms (ratio {p50w / base_total:.2f})"
        )
    print(f"batch lines answered while the user was active: {statistics.fmean(rates):.2f} lines/s")


if __name__ == "__main__":
    main()
