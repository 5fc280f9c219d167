"""Side-by-side serving benchmark: vLLM's own OpenAI server vs Enclave, same model.

Both servers run the prepared checkpoint with the same engine arguments (taken from the
model profile). vLLM's serving benchmark (backend openai-chat, random dataset) drives
each in turn, alternating the order every round so drift on a shared machine hits both
equally, and the ratios ours/vLLM are printed for output throughput and median TTFT.

    python scripts/bench.py [--concurrency 1 8] [--rounds 2] [--input-len 256 --output-len 128]
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
    procs = {
        "vllm": start(vllm_cmd, env, work / "vllm.log"),
        "ours": start(ours_cmd, {**env, "PYTHONPATH": str(ROOT)}, work / "ours.log"),
    }
    try:
        wait_ready(f"http://127.0.0.1:{ports['vllm']}/health", procs["vllm"], work / "vllm.log")
        wait_ready(f"http://127.0.0.1:{ports['ours']}/ready", procs["ours"], work / "ours.log")
        results: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(opts.rounds):
            for c in opts.concurrency:
                order = ["vllm", "ours"] if rnd % 2 == 0 else ["ours", "vllm"]
                for name in order:
                    r = run_benchmark(f"http://127.0.0.1:{ports[name]}", profile.name, checkpoint, c,
                                      max(8, c * opts.prompts_per_stream), opts.input_len, opts.output_len, seed=rnd)
                    results.setdefault((name, c), []).append(r)
                    print(f"round {rnd} c={c} {name}: {r['output_throughput']:.1f} tok/s, median TTFT {r['median_ttft_ms']:.0f} ms, failed {r.get('failed', 0)}", flush=True)
    finally:
        for proc in procs.values():
            stop(proc)

    print(f"\nmodel {profile.name}, input {opts.input_len} / output {opts.output_len} tokens, {opts.rounds} alternating rounds")
    print(f"{'conc':>4}  {'vLLM tok/s':>10}  {'ours tok/s':>10}  {'ratio':>6}  {'vLLM TTFT':>9}  {'ours TTFT':>9}  {'ratio':>6}")
    for c in opts.concurrency:
        tp = {n: statistics.mean(r["output_throughput"] for r in results[(n, c)]) for n in ("vllm", "ours")}
        ttft = {n: statistics.mean(r["median_ttft_ms"] for r in results[(n, c)]) for n in ("vllm", "ours")}
        print(f"{c:>4}  {tp['vllm']:>10.1f}  {tp['ours']:>10.1f}  {tp['ours'] / tp['vllm']:>6.3f}  "
              f"{ttft['vllm']:>7.0f}ms  {ttft['ours']:>7.0f}ms  {ttft['ours'] / ttft['vllm']:>6.3f}")
    print("targets: throughput ratio >= 0.95, median-TTFT ratio <= 1.10")


if __name__ == "__main__":
    main()
