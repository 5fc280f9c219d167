"""Where the rails' time to first token goes: servers that differ in one part of the
rails, taking turns request by request, each TTFT beside the first server's.

    python scripts/bench_rails_parts.py [--requests 40] [--parts off,on,hex-canary,no-intents,no-output]

`scripts/bench_guard.py` measures all rails on against off; this one takes them apart.
Each part is a server of the support deployment that changes one thing:

  off          ENCLAVE_RAILS=false
  on           every rail, with a pinned canary of words (so that runs compare)
  hex-canary   as `on`, with the canary pinned as hex (14 prompt tokens instead of 6)
  no-intents   as `on`, without the harmful-intent and topic rails and the decline stage
               (no embedding of the message alongside prefill)
  no-output    as `on`, without output rails (so without the canary in the prompt)

The requests are the benign support set, 8-token answers, a second apart (after the other
engines have stopped polling, as in bench_guard). Printed per part: TTFT p50 and p95 and
the median of the per-request ratios to the first part.
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, start, stop, wait_ready
from bench_guard import stream

ROOT = Path(__file__).resolve().parent.parent
WORD_CANARY = "enc orbit canyon lantern"
HEX_CANARY = "enc-3f9a1c07d2"


def _without_intents(rails: dict) -> None:
    flows = rails["rails"]["input"]["flows"]
    rails["rails"]["input"]["flows"] = [f for f in flows if f not in ("enclave harmful intent", "enclave off topic")]
    rails.setdefault("custom_data", {}).setdefault("enclave", {})["model_declines"] = {"enabled": False}


def _without_output(rails: dict) -> None:
    rails["rails"]["output"] = {"flows": []}


# part → (environment, edit of the support deployment's rails/config.yml or None)
PARTS = {
    "off": ({"ENCLAVE_RAILS": "false"}, None),
    "on": ({"ENCLAVE_RAILS_CANARY": WORD_CANARY}, None),
    "hex-canary": ({"ENCLAVE_RAILS_CANARY": HEX_CANARY}, None),
    "no-intents": ({"ENCLAVE_RAILS_CANARY": WORD_CANARY}, _without_intents),
    "no-output": ({"ENCLAVE_RAILS_CANARY": WORD_CANARY}, _without_output),
}


def deployment(work: Path, part: str) -> dict[str, str]:
    """The environment that serves `part`: the support deployment, or a copy of it with
    its rails edited."""
    env, edit = PARTS[part]
    if edit is None:
        return {**env, "ENCLAVE_DEPLOYMENT": "support"}
    root = work / "deployments"
    if not root.exists():
        shutil.copytree(ROOT / "deployments", root)
    target = root / f"support-{part}"
    shutil.copytree(root / "support", target)
    config = target / "rails" / "config.yml"
    rails = yaml.safe_load(config.read_text())
    edit(rails)
    config.write_text(yaml.safe_dump(rails, sort_keys=False))
    return {**env, "ENCLAVE_DEPLOYMENTS_DIR": str(root), "ENCLAVE_DEPLOYMENT": target.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="off,on,hex-canary,no-intents,no-output")
    parser.add_argument("--requests", type=int, default=40, help="requests per part")
    parser.add_argument("--gap", type=float, default=1.2, help="seconds between two requests")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    texts = [json.loads(x)["text"] for x in (ROOT / "tests/redteam/benign.jsonl").read_text().splitlines() if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="enclave-bench-parts-"))
    procs, clients = {}, {}
    try:
        for part in parts:
            port = free_port()
            env = {**os.environ, "ENCLAVE_DATA_DIR": str(work / part), "HF_HUB_OFFLINE": "1", **deployment(work, part)}
            procs[part] = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, work / f"{part}.log")
            clients[part] = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=300)
        for part in parts:
            base = str(clients[part].base_url).rstrip("/").removesuffix("/v1")
            wait_ready(f"{base}/ready", procs[part], work / f"{part}.log")
            for t in texts[:3]:  # warm: the rails' lazy parts, the engine's first steps
                stream(clients[part], t, 4)
        ttft: dict[str, list[float]] = {p: [] for p in parts}
        for i in range(args.requests):
            text = texts[i % len(texts)]
            k = i % len(parts)
            for part in parts[k:] + parts[:k]:  # each part first in turn
                time.sleep(args.gap)
                ttft[part].append(stream(clients[part], text, 8)[0])
        first = parts[0]
        p95 = lambda v: sorted(v)[int(0.95 * len(v))]
        for part in parts:
            paired = statistics.median(a / b for a, b in zip(ttft[part], ttft[first], strict=True))
            print(f"{part:<12} TTFT p50 {statistics.median(ttft[part]):6.1f} ms  p95 {p95(ttft[part]):6.1f} ms  "
                  f"median ratio to {first} {paired:.3f}  ({args.requests} requests, taking turns)")
    finally:
        for proc in procs.values():
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
