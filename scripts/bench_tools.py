"""What the tool-call constraint costs: time per output token with and without it, and
the grammar compile time, cold (a tool set never seen) and warm (the same set again).

One Enclave server on the default model; every figure is taken in alternating rounds
in one run and printed as a ratio, since these machines are shared and noisy.

    python scripts/bench_tools.py [--rounds 5] [--tokens 96]

Also compares the two ways `tool_choice: auto` could be decided: the single constrained
pass Enclave uses (text or a call in one automaton) against deciding first with a
one-token constrained choice and then generating the call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, start, stop, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.toolcalls.format import tools_prompt
from server.toolcalls.spec import plan_tools

NUMBERS = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9999}}}, "required": ["values"]}
PROMPT = "Count upwards from 1 and list every number, separated by commas."


def support_like_tools(tag: str) -> list[dict]:
    """Four tools shaped like the support pack; `tag` makes the set new to every cache."""
    def fn(name: str, params: dict) -> dict:
        return {"type": "function", "function": {"name": f"{name}_{tag}", "description": name, "parameters": params}}

    return [
        fn("lookup_ticket", {"type": "object", "properties": {"ticket_id": {"type": "string", "pattern": "^T-[0-9]{4}$"}}, "required": ["ticket_id"]}),
        fn("check_subscription", {"type": "object", "properties": {}}),
        fn("create_refund", {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}, "amount": {"type": "number", "minimum": 1, "maximum": 10000}, "reason": {"enum": ["damaged", "not_received", "other"]}}, "required": ["order_id", "amount", "reason"]}),
        fn("handoff", {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 120}}, "required": ["reason"]}),
    ]


def stream(client: httpx.Client, body: dict) -> dict:
    """TTFT, time per output token after the first, tokens, e2e for one streamed request."""
    t0 = time.perf_counter()
    first = last = None
    usage = {}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c["delta"].get("content") or c["delta"].get("tool_calls") for c in event.get("choices", [])):
                now = time.perf_counter()
                first = first or now
                last = now
    tokens = usage.get("completion_tokens", 0)
    return {"ttft": first - t0, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens, "e2e": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="enclave-bench-tools-"))
    port = free_port()
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", "ENCLAVE_DEPLOYMENT": "support"}
    proc = start([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env, data / "server.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc, data / "server.log")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        base = {"model": "smollm2", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": args.tokens}
        plain = {**base, "ignore_eos": True}
        tool = {**base, "tools": [{"type": "function", "function": {"name": "numbers", "parameters": NUMBERS}}], "tool_choice": "required"}
        stream(client, plain), stream(client, tool)  # warm both paths (and compile the tool grammar)

        tpot = {"plain": [], "tool": []}
        for r in range(args.rounds):
            order = [("plain", plain), ("tool", tool)] if r % 2 == 0 else [("tool", tool), ("plain", plain)]
            for name, body in order:
                for _ in range(3):
                    tpot[name].append(stream(client, body)["tpot"])

        ttft = {"no tools": [], "cold": [], "warm": []}
        ask = {**base, "messages": [{"role": "user", "content": "What is the status of ticket T-1001?"}], "max_tokens": 48}
        for _ in range(args.rounds):
            tag = uuid.uuid4().hex[:8]
            tools = {**ask, "tools": support_like_tools(tag), "tool_choice": "required"}
            # Baseline: the very same prompt (tool definitions as system text), unconstrained,
            # so the difference is the constraint alone, not the longer prompt.
            plan = plan_tools(tools["tools"], "required", True, None, None)
            same_prompt = {**ask, "messages": [{"role": "system", "content": tools_prompt(plan, "required")}, *ask["messages"]]}
            ttft["no tools"].append(stream(client, same_prompt)["ttft"])
            ttft["cold"].append(stream(client, tools)["ttft"])
            ttft["warm"].append(stream(client, tools)["ttft"])

        auto = {"single pass": [], "decide first": []}
        for _ in range(args.rounds):
            tools = support_like_tools("auto")
            auto["single pass"].append(stream(client, {**ask, "tools": tools, "tool_choice": "auto"})["e2e"])
            t0 = time.perf_counter()
            choice = {"type": "json_schema", "json_schema": {"name": "decision", "schema": {"enum": ["answer", *[t["function"]["name"] for t in tools]]}}}
            decided = client.post("/v1/chat/completions", json={**ask, "response_format": choice, "max_tokens": 32}).json()
            picked = json.loads(decided["choices"][0]["message"]["content"])
            if picked == "answer":  # then the same prompt unconstrained
                stream(client, ask)
            else:
                stream(client, {**ask, "tools": tools, "tool_choice": {"type": "function", "function": {"name": picked}}})
            auto["decide first"].append(time.perf_counter() - t0)
    finally:
        stop(proc)

    med = {k: statistics.median(v) for k, v in tpot.items()}
    print(f"time per output token: plain {med['plain'] * 1000:.1f} ms, tool-constrained {med['tool'] * 1000:.1f} ms, ratio {med['tool'] / med['plain']:.3f} (target <= 1.10)")
    t = {k: statistics.median(v) for k, v in ttft.items()}
    print(
        f"TTFT (median): same prompt unconstrained {t['no tools'] * 1000:.0f} ms, new tool set {t['cold'] * 1000:.0f} ms, same set again {t['warm'] * 1000:.0f} ms; "
        f"grammar compile cold ~{(t['cold'] - t['warm']) * 1000:.0f} ms, warm overhead {(t['warm'] - t['no tools']) * 1000:.0f} ms "
        f"(same prompt, so this is the constraint alone)"
    )
    a = {k: statistics.median(v) for k, v in auto.items()}
    print(f"tool_choice auto, e2e: single pass {a['single pass'] * 1000:.0f} ms, decide first {a['decide first'] * 1000:.0f} ms, ratio {a['decide first'] / a['single pass']:.2f}")


if __name__ == "__main__":
    main()
