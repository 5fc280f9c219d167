"""What the tool shortlist and grounded arguments add to a tool-calling turn: two servers of
the support deployment, one plain (every tool offered, arguments free) and one as served
by default (shortlist and grounding), taking turns request by request.

    python scripts/bench_shortlist.py [--requests 40] [--gap 0.5]

Each request is a support question (the development split, evals/dev) asking for a call
of the support pack's four tools, sent as client tools with `tool_choice: required`, so
the turn ends with the call. Each is sent twice to each server:

- with `max_tokens: 1`: the time to the first token, which holds all the shortlist adds
  (the embedding of the message and the ranking before prefill; fewer tools listed make
  the prompt shorter) and nothing of what the model then writes;
- whole, streamed: the time to the first event (the call's name) and to the end. The two
  servers call different tools with different arguments (the plain one mostly the same
  tool with no arguments), so this ratio is what a user waits, not a like-for-like cost.

Printed per server: p50 and p95 of each, the median of the per-request ratios to the
plain server, and how many calls named the expected tool.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, start, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVERS = {
    "plain": {"ENCLAVE_TOOL_SHORTLIST": "0", "ENCLAVE_TOOL_GROUNDING": "false"},
    "shortlist": {},
}


def support_tools() -> list[dict]:
    from tools import support

    pack = (support.check_subscription_status, support.create_refund, support.handoff_to_agent, support.lookup_ticket)
    return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}} for t in pack]


def call(client: httpx.Client, text: str, tools: list[dict]) -> tuple[float, float, str | None]:
    """(ms to the first event, ms to the end, the first call's name) of one streamed turn."""
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": text}],
        "tools": tools,
        "tool_choice": "required",
        "max_tokens": 80,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    first, name = None, None
    with client.stream("POST", "/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices") or []:
                delta = choice.get("delta") or {}
                if first is None and (delta.get("tool_calls") or delta.get("content")):
                    first = time.perf_counter()
                for tc in delta.get("tool_calls") or []:
                    name = name or (tc.get("function") or {}).get("name")
    end = time.perf_counter()
    return ((first or end) - t0) * 1e3, (end - t0) * 1e3, name


def first_token(client: httpx.Client, text: str, tools: list[dict]) -> float:
    """ms to a one-token answer of the same request."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": text}], "tools": tools, "tool_choice": "required", "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    client.post("/chat/completions", json=body).raise_for_status()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between two requests")
    args = parser.parse_args()
    cases = [json.loads(x) for x in (ROOT / "evals/dev/tool_selection.jsonl").read_text().splitlines() if x.strip()]
    tools = support_tools()
    work = Path(tempfile.mkdtemp(prefix="enclave-bench-shortlist-"))
    procs, clients = {}, {}
    try:
        for name, extra in SERVERS.items():
            port = free_port()
            env = {**os.environ, "ENCLAVE_DATA_DIR": str(work / name), "HF_HUB_OFFLINE": "1", "ENCLAVE_DEPLOYMENT": "support", **extra}
            procs[name] = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, work / f"{name}.log")
            clients[name] = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=300)
        for name in SERVERS:
            base = str(clients[name].base_url).rstrip("/").removesuffix("/v1")
            wait_ready(f"{base}/ready", procs[name], work / f"{name}.log")
            for case in cases[:3]:  # warm: the tools' embeddings, the constraint compiler
                call(clients[name], case["messages"][-1]["content"], tools)
        names = list(SERVERS)
        ttfts: dict[str, list[float]] = {n: [] for n in names}
        firsts: dict[str, list[float]] = {n: [] for n in names}
        ends: dict[str, list[float]] = {n: [] for n in names}
        right = dict.fromkeys(names, 0)
        for i in range(args.requests):
            case = cases[i % len(cases)]
            k = i % len(names)
            for name in names[k:] + names[:k]:  # each server first in turn
                time.sleep(args.gap)
                ttfts[name].append(first_token(clients[name], case["messages"][-1]["content"], tools))
                time.sleep(args.gap)
                first, end, called = call(clients[name], case["messages"][-1]["content"], tools)
                firsts[name].append(first)
                ends[name].append(end)
                right[name] += called == case["expect"]["tool"]
        p95 = lambda v: sorted(v)[int(0.95 * len(v))]
        ratio = lambda series, name: statistics.median(a / b for a, b in zip(series[name], series["plain"], strict=True))
        for name in names:
            print(
                f"{name:<10} first token p50 {statistics.median(ttfts[name]):6.1f} ms p95 {p95(ttfts[name]):6.1f} (ratio {ratio(ttfts, name):.3f})  "
                f"first event p50 {statistics.median(firsts[name]):6.1f} ms (ratio {ratio(firsts, name):.3f})  "
                f"whole call p50 {statistics.median(ends[name]):6.1f} ms p95 {p95(ends[name]):6.1f} (ratio {ratio(ends, name):.3f})  "
                f"right tool {right[name]}/{args.requests}"
            )
    finally:
        for proc in procs.values():
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
