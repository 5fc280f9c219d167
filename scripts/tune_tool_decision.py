"""Chooses `call_at` and `call_at_cards` (server/toolcalls/shortlist.py): under
`tool_choice: auto`, the leader's score from which a turn must call a tool instead of
leaving it to the model (for tools that declare example requests, and for tools known by
their card only, as a client's are).

    python scripts/tune_tool_decision.py

The ranking needs no engine: the server's embedding model over the support pack's tools,
as in scripts/tune_shortlist.py. Requests that need a tool: evals/dev/tool_selection.jsonl.
Requests that need none: the development questions of evals/dev/grounded.jsonl, the last
turns of evals/dev/memory.jsonl and `SMALL_TALK` below. For each threshold: the share of
tool requests that call (and call the right tool: the leader), and the share of the others
that would call (false calls). Chosen on dev: the lowest threshold with at most 5 % false
calls. The same threshold is then reported on the held-out eval set (tool_selection;
grounded and memory as the requests that need no tool), which is never tuned on.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

FALSE_CALLS = 0.05
SMALL_TALK = [
    "Hello there!",
    "Thanks, that helps a lot.",
    "Can you explain what you can do for me?",
    "What is the weather like in Paris?",
    "Good morning, I have a question.",
    "Please answer in German from now on.",
    "That's all, goodbye.",
    "Are you a bot?",
]
THRESHOLDS = [round(0.30 + 0.025 * i, 3) for i in range(29)]


def cases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_user(case: dict) -> list[dict]:
    if "messages" in case:
        return case["messages"]
    return [{"role": "user", "content": case["turns"][-1]}]


async def main() -> None:
    from server.embedder import Embedder, packaged_model_dir
    from server.handles import Late
    from server.toolcalls.registry import Registry
    from server.toolcalls.shortlist import Shortlister, ShortlistPolicy
    from server.toolcalls.spec import ToolSpec

    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    registry = Registry.load(["support"])
    with_asks = [ToolSpec(t.name, t.description, t.parameters, server=True, asks=tuple(t.asks)) for t in registry.packs["support"]]
    # A client's tools have only their card (OpenAI's tool format has no example requests):
    # the same tools without their `asks` stand for them, with a threshold of their own.
    cards_only = [ToolSpec(t.name, t.description, t.parameters) for t in registry.packs["support"]]
    shortlister = Shortlister(Late(embedder), ShortlistPolicy())
    for tools, name in ((with_asks, "tools with example requests (a pack's): call_at"), (cards_only, "tools with their card only (a client's): call_at_cards")):
        print(f"== {name}")
        await table(shortlister, tools)


async def table(shortlister, tools) -> None:
    from server.toolcalls.grounding import conversation_text

    async def leaders(items: list[dict]) -> list[tuple[float, str, str | None]]:
        out = []
        for case in items:
            messages = last_user(case)
            ranked = await shortlister.rank(messages[-1]["content"], tools, conversation_text(messages))
            out.append((ranked[0].score, ranked[0].tool.name, case.get("expect", {}).get("tool")))
        return out

    dev = ROOT / "evals" / "dev"
    held = ROOT / "evals" / "datasets"
    splits = {
        "dev": (
            await leaders(cases(dev / "tool_selection.jsonl")),
            await leaders(cases(dev / "grounded.jsonl") + cases(dev / "memory.jsonl") + [{"messages": [{"role": "user", "content": t}]} for t in SMALL_TALK]),
        ),
        "held-out": (
            await leaders(cases(held / "tool_selection.jsonl")),
            await leaders(cases(held / "grounded.jsonl") + cases(held / "memory.jsonl")),
        ),
    }

    def rates(split: str, t: float) -> tuple[float, float, float]:
        need, none = splits[split]
        calls = sum(s >= t for s, _, _ in need) / len(need)
        right = sum(s >= t and name == want for s, name, want in need) / len(need)
        false = sum(s >= t for s, _, _ in none) / len(none)
        return calls, right, false

    print(f"{'call_at':>7} | {'dev calls':>9} {'right':>6} {'false':>6} | {'held-out calls':>14} {'right':>6} {'false':>6}")
    chosen = None
    for t in THRESHOLDS:
        d, h = rates("dev", t), rates("held-out", t)
        if chosen is None and d[2] <= FALSE_CALLS:
            chosen = t
        mark = " <- chosen on dev" if chosen == t else ""
        print(f"{t:7.3f} | {d[0]:9.2f} {d[1]:6.2f} {d[2]:6.2f} | {h[0]:14.2f} {h[1]:6.2f} {h[2]:6.2f}{mark}")
    print(f"chosen: {chosen} (the lowest with at most {FALSE_CALLS:.0%} false calls on dev)")


if __name__ == "__main__":
    asyncio.run(main())
