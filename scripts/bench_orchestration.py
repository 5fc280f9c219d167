"""What an agent, a handoff and a workflow step add to a turn, side by side in one run.

One `enclave serve` of the support deployment on the real engine (rails on, as
deployed) serves, in alternating blocks:

* plain: the served model, with the billing agent's instructions and tools in the
  request itself, answering a billing question;
* agent:billing: the billing agent asked directly (its handoff decision: it weighs
  orders and account, and keeps the turn);
* agent:coordinator: the coordinator, which hands the turn to billing first;
* workflow: the refund workflow in a new conversation, as two turns: the request
  (identify → check (lookup_order) → eligible → confirm, which creates the pending
  refund) and the customer's "no" (confirm → declined, which cancels it).

The agents' answers are the billing agent's, on the same prompt, so their differences
from plain are the agent stage's own: the holder lookup, the ranking of the candidates
(one embedding of the message with the local model), and a constrained handoff call
when the ranking leaves it open. The workflow's turns generate nothing (the order id and
the reason are taken from the message as written); their time is the rails, the nodes'
SQL writes and the tools.

    python scripts/bench_orchestration.py --turns 12 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import free_port, start, stop, wait_ready

QUESTIONS = [
    "How much do I pay for my subscription?",
    "Which plan am I on and what does it cost?",
    "When is my next invoice due?",
    "Why was I charged twice this month?",
]


def workflow_block(client: httpx.Client, turns: int, offset: int) -> tuple[list[float], list[float], list[int]]:
    asked, answered, nodes = [], [], []
    for i in range(turns):
        conversation = f"bench-refund-{offset}-{i}"
        for text, times in (("Please refund order ORD-5002, it arrived damaged.", asked), ("no", answered)):
            body = {"model": "workflow:refund", "messages": [{"role": "user", "content": text}], "conversation": conversation, "max_tokens": 24}
            started = time.perf_counter()
            r = client.post("/chat/completions", json=body)
            times.append(time.perf_counter() - started)
            r.raise_for_status()
            nodes.append(len(r.json()["workflow"]["path"]))
    return asked, answered, nodes


def block(client: httpx.Client, mode: str, billing: dict, turns: int, served: str) -> tuple[list[float], list[str]]:
    times, decided = [], []
    for i in range(turns):
        text = QUESTIONS[i % len(QUESTIONS)]
        body: dict = {"messages": [{"role": "user", "content": text}], "max_tokens": 24, "temperature": 0}
        if mode == "plain":
            body["model"] = served
            body["messages"].insert(0, {"role": "system", "content": billing["instructions"]})
            body["tools"] = [{"type": "server", "name": t} for t in billing["tools"]]
        else:
            body["model"] = mode
        started = time.perf_counter()
        r = client.post("/chat/completions", json=body)
        times.append(time.perf_counter() - started)
        r.raise_for_status()
        agent = r.json().get("agent")
        if agent is not None:
            decided += [f"{h['from']}->{h['to']} by {h['by']}" for h in agent["handoffs"]]
    return times, decided


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    billing = yaml.safe_load((ROOT / "deployments/support/agents/billing.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "ENCLAVE_DEPLOYMENT": "support",
            "ENCLAVE_DATA_DIR": str(work / "data"),
            # Every workflow turn looks an order up and creates a pending refund.
            "ENCLAVE_TOOL_RATE_LIMITS": json.dumps({"lookup_order": "10000/minute", "create_refund": "10000/minute"}),
        }
        made = subprocess.run(
            [sys.executable, "-m", "server.cli", "keys", "create", "--tenant", "acme", "--user", "cust_1001", "--scope", "chat", "--scope", "models", "--scope", "tools:support"],
            env=env, capture_output=True, text=True, check=True,
        )
        key = json.loads(made.stdout)["key"]
        port = free_port()
        proc = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, work / "server.log")
        try:
            wait_ready(f"http://127.0.0.1:{port}/ready", proc, work / "server.log")
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=300)
            served = client.get("/models").json()["data"][0]["id"]
            results: dict[str, list[float]] = {"plain": [], "agent:billing": [], "agent:coordinator": []}
            decisions: dict[str, list[str]] = {m: [] for m in results}
            flows: dict[str, list[float]] = {"workflow request": [], "workflow answer": []}
            nodes: list[int] = []
            for mode in results:  # warm-up: the embedding of the examples, the constraints
                block(client, mode, billing, 4, served)
            workflow_block(client, 2, -1)
            for r in range(args.rounds):
                order = [*results, "workflow"] if r % 2 == 0 else ["workflow", *reversed(results)]
                for mode in order:
                    if mode == "workflow":
                        asked, answered, counted = workflow_block(client, args.turns // 2 or 1, r)
                        flows["workflow request"] += asked
                        flows["workflow answer"] += answered
                        nodes += counted
                        continue
                    times, decided = block(client, mode, billing, args.turns, served)
                    results[mode] += times
                    decisions[mode] += decided
        finally:
            stop(proc)
    p50 = {m: statistics.median(v) * 1000 for m, v in results.items()}
    mean = {m: statistics.fmean(v) * 1000 for m, v in results.items()}
    print(f"turns per mode: {len(results['plain'])}; max_tokens 24, temperature 0, real engine")
    for mode in results:
        counts = {d: decisions[mode].count(d) for d in sorted(set(decisions[mode]))}
        print(f"{mode:18s} p50 {p50[mode]:8.1f} ms  mean {mean[mode]:8.1f} ms  ratio p50 vs plain {p50[mode] / p50['plain']:.3f}  decisions {counts}")
    for name, times in flows.items():
        median = statistics.median(times) * 1000
        print(f"{name:18s} p50 {median:8.1f} ms  mean {statistics.fmean(times) * 1000:8.1f} ms  ratio p50 vs plain {median / p50['plain']:.3f}  ({len(times)} turns)")
    steps = statistics.fmean(nodes)
    per_node = statistics.median(flows["workflow request"] + flows["workflow answer"]) * 1000 / steps
    print(f"workflow nodes per turn: {steps:.1f}; p50 per node {per_node:.1f} ms, ratio vs a plain turn {per_node / p50['plain']:.3f}")


if __name__ == "__main__":
    main()
