"""The whole server's memory: every process of `enclave serve` (API, engine core, workers),
summed as PSS (shared pages split between the processes that map them, so nothing is
counted twice), after it is ready and has answered a few requests.

    python scripts/bench_footprint.py [--variant NAME=ENV=VALUE ...]

By default two variants run one after the other in this run: "before", the flat 2 GiB
KV cache the profile used to set (VLLM_CPU_KVCACHE_SPACE=2), and "after", the KV cache
sized from the profile. Each server runs alone, so neither squeezes the other.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, start, stop, wait_ready

GB = 1e9


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def pss_bytes(pid: int, field: str = "Pss") -> int:
    """A field of /proc/PID/smaps_rollup in bytes: Pss, or its Pss_Anon / Pss_File parts."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def measure(label: str, extra_env: dict[str, str], requests: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"enclave-footprint-{label}-"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ENCLAVE_DATA_DIR": str(work / "data"), **extra_env}
    log = work / "server.log"
    started = time.monotonic()
    proc = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc, log, timeout=900)
        ready_s = time.monotonic() - started
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=120) as client:
            for i in range(requests):
                r = client.post("/chat/completions", json={"model": "smollm2-135m-instruct", "max_tokens": 32,
                                                           "messages": [{"role": "user", "content": f"Say hello in five words ({i})."}]})
                r.raise_for_status()
        time.sleep(2)
        procs = {p: (name(p), pss_bytes(p), pss_bytes(p, "Pss_Anon")) for p in tree(proc.pid)}
    finally:
        stop(proc)
    total = sum(b for _, b, _ in procs.values())
    return {"label": label, "total": total, "ready_s": ready_s, "procs": sorted(procs.values(), key=lambda x: -x[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", help="NAME=VAR=VALUE[,VAR=VALUE]; default: before (flat 2 GiB) and after (sized)")
    p.add_argument("--requests", type=int, default=5)
    args = p.parse_args()
    variants: list[tuple[str, dict[str, str]]] = []
    for spec in args.variant or ["before=VLLM_CPU_KVCACHE_SPACE=2", "after="]:
        label, _, rest = spec.partition("=")
        variants.append((label, dict(kv.split("=", 1) for kv in rest.split(",") if kv)))
    results = []
    for label, env in variants:
        r = measure(label, env, args.requests)
        results.append(r)
        parts = ", ".join(f"{n} {b / GB:.2f} (anon {a / GB:.2f})" for n, b, a in r["procs"] if b > 50e6)
        print(f"{r['label']:>8}: {r['total'] / GB:.2f} GB PSS over {len(r['procs'])} processes ({parts}); ready in {r['ready_s']:.0f} s", flush=True)
    if len(results) >= 2:
        print(f"ratio {results[-1]['label']}/{results[0]['label']}: {results[-1]['total'] / results[0]['total']:.2f}")


if __name__ == "__main__":
    main()
