"""Side-by-side serving benchmark: vLLM's own OpenAI server vs Enclave, same model.

Both servers run the prepared checkpoint with the same engine arguments (taken from the
model profile). vLLM's serving benchmark (backend openai-chat, random dataset) drives
each in turn, alternating the order every round so drift on a shared machine hits both
equally, and the ratios ours/vLLM are printed for output throughput and median TTFT.

    python scripts/bench.py [--concurrency 1 8] [--rounds 2] [--input-len 256 --output-len 128]

With --remote, Enclave runs no engine of its own: it generates on that same vLLM server
through the remote engine, so the ratios are what the extra hop (and our pipeline) cost
a deployment whose model servers are a fleet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.checkpoints import verify  # noqa: E402
from server.config import load_settings  # noqa: E402
from server.engine.vllm import api_server_flags, engine_arguments  # noqa: E402
from server.profiles import find_profile  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # The engine core and workers share the group: kill them all, then reap.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc), children not included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_benchmark(base_url: str, served: str, checkpoint: Path, concurrency: int, prompts: int, input_len: int, output_len: int, seed: int) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
        "--model", str(checkpoint), "--served-model-name", served, "--tokenizer", str(checkpoint),
        "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
        "--seed", str(seed), "--disable-tqdm", "--num-warmups", "1",
    ])
    # The benchmark prints its whole configuration and a report per run; keep only ours.
    with contextlib.redirect_stdout(io.StringIO()):
        return main(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="profile name (default: the configured model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts-per-stream", type=int, default=4, help="prompts = concurrency x this (at least 8)")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--remote", action="store_true", help="Enclave generates on the vLLM server (remote engine) instead of in-process")
    parser.add_argument("--no-rails", action="store_true", help="Enclave without guardrails: the engine path alone (scripts/bench_guard.py measures the rails)")
    opts = parser.parse_args()

    settings = load_settings(**({"model": opts.model} if opts.model else {}))
    profile = find_profile(settings.profiles_dir, settings.model)
    checkpoint = verify(profile, settings.models_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **profile.env}
    work = Path(tempfile.mkdtemp(prefix="enclave-bench-"))
    ports = {"vllm": free_port(), "ours": free_port()}
    vllm_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(ports["vllm"]),
                *api_server_flags(engine_arguments(profile, checkpoint))]
    ours_cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(ports["ours"]), "--data-dir", str(work / "data")]
    ours_env = {**env, "PYTHONPATH": str(ROOT)}
    if opts.no_rails:
        ours_env["ENCLAVE_RAILS"] = "false"
    if opts.remote:
        ours_env["ENCLAVE_UPSTREAMS"] = json.dumps([f"http://127.0.0.1:{ports['vllm']}/v1"])
    procs = {"vllm": start(vllm_cmd, env, work / "vllm.log")}
    try:
        # Started one after the other: the remote engine asks the upstream its context length.
        wait_ready(f"http://127.0.0.1:{ports['vllm']}/health", procs["vllm"], work / "vllm.log")
        procs["ours"] = start(ours_cmd, ours_env, work / "ours.log")
        wait_ready(f"http://127.0.0.1:{ports['ours']}/ready", procs["ours"], work / "ours.log")
        # One unrecorded pass each: first requests pay for lazy set-up (rails, caches).
        for name in ("vllm", "ours"):
            run_benchmark(f"http://127.0.0.1:{ports[name]}", profile.name, checkpoint, max(opts.concurrency), 8, opts.input_len, opts.output_len, seed=1000 + (name == "ours"))
        results: dict[tuple[str, int], list[dict]] = {}
        cpu_before, requests = cpu_seconds(procs["ours"].pid), 0
        for rnd in range(opts.rounds):
            for c in opts.concurrency:
                order = ["vllm", "ours"] if rnd % 2 == 0 else ["ours", "vllm"]
                for name in order:
                    # Fresh prompts for each server: with --remote both reach the same vLLM,
                    # whose prefix cache would otherwise favour whoever goes second.
                    seed = 2 * rnd + (name == "ours")
                    r = run_benchmark(f"http://127.0.0.1:{ports[name]}", profile.name, checkpoint, c,
                                      max(8, c * opts.prompts_per_stream), opts.input_len, opts.output_len, seed=seed)
                    results.setdefault((name, c), []).append(r)
                    requests += r["completed"] if name == "ours" else 0
                    print(f"round {rnd} c={c} {name}: {r['output_throughput']:.1f} tok/s, median TTFT {r['median_ttft_ms']:.0f} ms, failed {r.get('failed', 0)}", flush=True)
        # The server process alone (an in-process engine's core runs in a child process).
        cpu_per_request = (cpu_seconds(procs["ours"].pid) - cpu_before) / max(requests, 1)
    finally:
        for proc in procs.values():
            stop(proc)

    mode = (" (Enclave on the remote engine)" if opts.remote else "") + (" (rails off)" if opts.no_rails else "")
    print(f"\nmodel {profile.name}{mode}, input {opts.input_len} / output {opts.output_len} tokens, {opts.rounds} alternating rounds")
    print(f"{'conc':>4}  {'vLLM tok/s':>10}  {'ours tok/s':>10}  {'ratio':>6}  {'vLLM TTFT':>9}  {'ours TTFT':>9}  {'ratio':>6}")
    for c in opts.concurrency:
        tp = {n: statistics.mean(r["output_throughput"] for r in results[(n, c)]) for n in ("vllm", "ours")}
        ttft = {n: statistics.mean(r["median_ttft_ms"] for r in results[(n, c)]) for n in ("vllm", "ours")}
        print(f"{c:>4}  {tp['vllm']:>10.1f}  {tp['ours']:>10.1f}  {tp['ours'] / tp['vllm']:>6.3f}  "
              f"{ttft['vllm']:>7.0f}ms  {ttft['ours']:>7.0f}ms  {ttft['ours'] / ttft['vllm']:>6.3f}")
    print("targets: throughput ratio >= 0.95, median-TTFT ratio <= 1.10")
    print(f"Enclave server process CPU per request: {cpu_per_request * 1000:.1f} ms over {requests} requests")


if __name__ == "__main__":
    main()
