"""What the guardrails cost: TTFT and throughput with all default rails on vs off, and
each rail's latency (p50/p95) as the server reports it in /metrics.

    python scripts/bench_guard.py [--rounds 3] [--concurrency 8] [--nemo] [--remote]

Two servers run side by side on the same model: one with rails/ (the default), one
with ENCLAVE_RAILS=false (and with --nemo a third, whose rails all run through NeMo's
Colang runtime: ENCLAVE_RAILS_COMPILED=false). For TTFT the servers take turns request
by request, the same request on each, each after the other's engine has gone idle
(vLLM's CPU engine polls on one core for a second after its last step: --gap), so the
machine's drift falls on both alike; throughput is timed in blocks, the order swapped
every round. The requests are the benign
support set of the red-team tests (tests/redteam/benign.jsonl) with a support system
prompt: the traffic the rails are meant to pass, where their cost is pure overhead.

With --remote the servers generate on one vLLM OpenAI server (the remote engine, as
scripts/bench.py --remote starts it) instead of in-process, and the CPU time each server
process spends per request is printed too: what the rails cost a gateway whose model
runs elsewhere (the servers then share one engine and its prefix cache: the CPU figure is
the point there, not TTFT).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cpu_seconds, free_port, start, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are the customer support assistant of Acme. Answer briefly and politely."
MODEL = "smollm2"


def stream(client: httpx.Client, text: str, max_tokens: int) -> tuple[float, int, float]:
    """(TTFT ms, completion tokens, seconds) of one streamed chat completion."""
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", "/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return ((first or end) - t0) * 1000, tokens, end - t0


def rail_quantiles(metrics: str) -> dict[tuple[str, str], dict[str, float]]:
    out: dict[tuple[str, str], dict[str, float]] = {}
    for m in re.finditer(r"enclave_rail_latency_recent_seconds\{([^}]*)\} ([\d.e+-]+)", metrics):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out.setdefault((labels["stage"], labels["rail"]), {})[labels["quantile"]] = float(m.group(2)) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30, help="sequential requests per round, per server")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between throughput blocks")
    parser.add_argument("--gap", type=float, default=1.2, help="seconds between two TTFT requests")
    parser.add_argument("--nemo", action="store_true", help="a third server: rails on, every check through NeMo's runtime")
    parser.add_argument("--remote", action="store_true", help="the servers generate on one vLLM server; prints their CPU per request")
    args = parser.parse_args()
    texts = [json.loads(x)["text"] for x in (ROOT / "tests/redteam/benign.jsonl").read_text().splitlines() if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="enclave-bench-guard-"))
    procs, clients = {}, {}
    upstream: dict[str, str] = {}
    try:
        if args.remote:
            upstream["ENCLAVE_UPSTREAMS"] = json.dumps([start_upstream(work, procs)])
        servers = [("on", "true", "true"), ("off", "false", "true")] + ([("nemo", "true", "false")] if args.nemo else [])
        for name, rails, compiled in servers:
            port = free_port()
            env = {
                **os.environ,
                "ENCLAVE_DATA_DIR": str(work / name),
                "HF_HUB_OFFLINE": "1",
                "ENCLAVE_RAILS": rails,
                "ENCLAVE_RAILS_COMPILED": compiled,
                "ENCLAVE_DEPLOYMENT": "support",
                **upstream,
            }
            procs[name] = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, work / f"{name}.log")
            wait_ready(f"http://127.0.0.1:{port}/ready", procs[name], work / f"{name}.log")
            clients[name] = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=300)
        for c in clients.values():  # warm both (prefix cache of the system prompt, rails' lazy parts)
            for t in texts[:3]:
                stream(c, t, 4)
        names = [n for n, _, _ in servers]
        ttft: dict[str, list[float]] = {n: [] for n in names}
        tput: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}  # seconds per request, per round
        rotated = lambda k: names[k % len(names) :] + names[: k % len(names)]
        for r in range(args.rounds):
            cpu0 = {n: cpu_seconds(procs[n].pid) for n in names}
            for i in range(args.requests):
                text = texts[(r * args.requests + i) % len(texts)]
                for name in rotated(r * args.requests + i):
                    time.sleep(args.gap)
                    ttft[name].append(stream(clients[name], text, 8)[0])
            batch = [texts[(r * 7 + k) % len(texts)] for k in range(args.concurrency * 2)]
            for name in rotated(r):
                # vLLM's CPU engine keeps its cores busy for a while after a burst: let the
                # other server's engine settle before timing this one.
                time.sleep(args.settle)
                for t in texts[:2]:
                    stream(clients[name], t, 4)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    done = list(pool.map(lambda t, c=clients[name]: stream(c, t, args.max_tokens), batch))
                tput[name].append(sum(d[1] for d in done) / (time.perf_counter() - t0))
            for name in names:
                cpu[name].append((cpu_seconds(procs[name].pid) - cpu0[name]) / (args.requests + len(batch) + 2))
        on, off = statistics.median(ttft["on"]), statistics.median(ttft["off"])
        p95 = lambda v: sorted(v)[int(0.95 * len(v))]
        paired = statistics.median(a / b for a, b in zip(ttft["on"], ttft["off"], strict=True))
        print(f"TTFT p50: rails on {on:.1f} ms, off {off:.1f} ms, ratio {on / off:.3f}   "
              f"(p95 {p95(ttft['on']):.1f} vs {p95(ttft['off']):.1f} ms, ratio {p95(ttft['on']) / p95(ttft['off']):.3f}; "
              f"{len(ttft['on'])} requests each, taking turns; median of the per-request ratios {paired:.3f})")
        t_on, t_off = statistics.median(tput["on"]), statistics.median(tput["off"])
        print(f"throughput ({args.concurrency} concurrent streams, {args.max_tokens} tokens): rails on {t_on:.1f} tok/s, "
              f"off {t_off:.1f} tok/s, ratio {t_on / t_off:.3f}")
        if args.nemo:
            nemo, t_nemo = statistics.median(ttft["nemo"]), statistics.median(tput["nemo"])
            print(f"rails through NeMo's runtime (ENCLAVE_RAILS_COMPILED=false): TTFT p50 {nemo:.1f} ms (ratio to off {nemo / off:.3f}, "
                  f"p95 {p95(ttft['nemo']):.1f} ms), throughput {t_nemo:.1f} tok/s (ratio {t_nemo / t_off:.3f})")
        if args.remote:
            c_on, c_off = statistics.median(cpu["on"]) * 1000, statistics.median(cpu["off"]) * 1000
            extra = f", through NeMo {statistics.median(cpu['nemo']) * 1000:.1f} ms" if args.nemo else ""
            print(f"server process CPU per request (remote engine): rails on {c_on:.1f} ms, off {c_off:.1f} ms, ratio {c_on / c_off:.3f}{extra}")
        metrics = clients["on"].get(str(clients["on"].base_url).rstrip("/").removesuffix("/v1") + "/metrics").text
        print("per-rail latency from /metrics (enclave_rail_latency_recent_seconds):")
        for (stage, rail), q in sorted(rail_quantiles(metrics).items()):
            print(f"  {stage:<12} {rail:<32} p50 {q.get('0.5', 0):6.2f} ms   p95 {q.get('0.95', 0):6.2f} ms")
    finally:
        for proc in procs.values():
            stop(proc)


def start_upstream(work: Path, procs: dict) -> str:
    """vLLM's own OpenAI server on the default profile, as scripts/bench.py --remote runs it."""
    from server.checkpoints import verify
    from server.config import load_settings
    from server.engine.vllm import api_server_flags, engine_arguments
    from server.profiles import find_profile

    settings = load_settings()
    profile = find_profile(settings.profiles_dir, settings.model)
    checkpoint = verify(profile, settings.models_dir)
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           *api_server_flags(engine_arguments(profile, checkpoint))]
    procs["vllm"] = start(cmd, {**os.environ, "HF_HUB_OFFLINE": "1", **profile.env}, work / "vllm.log")
    wait_ready(f"http://127.0.0.1:{port}/health", procs["vllm"], work / "vllm.log")
    return f"http://127.0.0.1:{port}/v1"


if __name__ == "__main__":
    main()
