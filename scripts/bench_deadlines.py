"""What a client waits when the engine stalls or dies, with and without the server's
deadlines, side by side in one run.

    python scripts/bench_deadlines.py [--stall 10] [--client-timeout 90]

Two servers in turn, the default deployment: "before" with the stall limit out of reach
(as the server was: no deadline at all), "after" with ENCLAVE_STALL_TIMEOUT_S=--stall.
For each: a normal request's latency; then every engine process is stopped (SIGSTOP) and
one request is timed until it ends (a 504) or the client gives up; then the engine is
resumed, and, on the "after" server, killed (SIGKILL): the time until /ready says 503
and until it serves again is taken. (Before, /ready stayed 200 with a dead engine and the
server never recovered; supervision cannot be switched off to measure that again.)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, start, stop, wait_ready
from bench_footprint import tree

BODY = {"model": "smollm2-135m-instruct", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello in five words."}]}


def engine_pids(server_pid: int) -> list[int]:
    pids = []
    for pid in tree(server_pid)[1:]:
        try:
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def timed_request(base: str, timeout: float) -> tuple[float, str]:
    started = time.monotonic()
    try:
        r = httpx.post(f"{base}/v1/chat/completions", json=BODY, timeout=timeout)
        outcome = f"{r.status_code} {r.json().get('error', {}).get('code', 'ok') if r.status_code != 200 else 'ok'}"
    except httpx.TimeoutException:
        outcome = "client gave up"
    return time.monotonic() - started, outcome


def until(check, limit: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def ready_status(base: str) -> int:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def run(label: str, stall_s: float, client_timeout: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"enclave-deadlines-{label}-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ENCLAVE_DATA_DIR": str(work / "data"), "ENCLAVE_STALL_TIMEOUT_S": str(stall_s),
           "ENCLAVE_ENGINE_OVERRIDES": '{"max_model_len": 2048}'}
    log = work / "server.log"
    proc = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, log)
    out: dict = {"label": label}
    try:
        wait_ready(f"{base}/ready", proc, log, timeout=900)
        out["normal"] = timed_request(base, client_timeout)
        pids = engine_pids(proc.pid)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        out["stalled"] = timed_request(base, client_timeout)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        if label == "after":  # the supervisor cannot be switched off: no "before" for a kill
            time.sleep(2)
            for pid in engine_pids(proc.pid):
                os.kill(pid, signal.SIGKILL)
            out["to_503"] = until(lambda: ready_status(base) == 503, 30)
            out["to_serving"] = until(lambda: ready_status(base) == 200, 180) if out["to_503"] is not None else None
    finally:
        stop(proc)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stall", type=float, default=10.0, help="the 'after' server's ENCLAVE_STALL_TIMEOUT_S")
    p.add_argument("--client-timeout", type=float, default=90.0, help="how long the client waits before giving up")
    args = p.parse_args()
    results = [run("before", 10**6, args.client_timeout), run("after", args.stall, args.client_timeout)]
    for r in results:
        (n, n_out), (s, s_out) = r["normal"], r["stalled"]
        killed = ""
        if "to_503" in r:
            killed = f"; engine killed: /ready 503 after {r['to_503']:.1f} s" if r["to_503"] is not None else "; engine killed: /ready stayed 200 for 30 s"
            killed += f", serving again after {r['to_serving']:.1f} s" if r.get("to_serving") is not None else ""
        print(f"{r['label']:>7}: normal request {n:.2f} s ({n_out}); stalled engine: request ended after {s:.1f} s ({s_out}){killed}")
    before, after = results
    print(f"ratio after/before, time a client waits on a stalled engine: {after['stalled'][0] / before['stalled'][0]:.2f} (before: the client's own {args.client_timeout:g} s timeout)")


if __name__ == "__main__":
    main()
