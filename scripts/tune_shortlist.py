"""Chooses the tool shortlist's settings (server/toolcalls/shortlist.py) on the development
split, and reports the same settings on the held-out split it was never tuned on.

    python scripts/tune_shortlist.py [--dev evals/dev/tool_selection.jsonl]
                                     [--heldout evals/datasets/tool_selection.jsonl]

The ranking needs no engine: the server's embedding model (its ONNX path, as served) over
the support pack's tools. For each setting, per split: how often the leader is the
expected tool (top-1), how often the offered shortlist holds it (recall; the model can
only call what it is offered), and how many tools are offered on average. The model
decides only among a shortlist of two or more, so recall with few tools offered is what
counts; top-1 is the floor when the leader is offered alone.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def load_cases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def evaluate(shortlister, tools, cases) -> tuple[float, float, float, list[str]]:
    from server.toolcalls.grounding import conversation_text

    top1 = recall = offered = 0
    misses = []
    for case in cases:
        messages = case["messages"]
        picked, ranked = await shortlister.shortlist(tools, messages, conversation_text(messages))
        want = case["expect"]["tool"]
        top1 += ranked[0].tool.name == want
        recall += want in [t.name for t in picked]
        offered += len(picked)
        if want not in [t.name for t in picked]:
            misses.append(f"{case['id']}: offered {[t.name for t in picked]}")
    n = len(cases)
    return top1 / n, recall / n, offered / n, misses


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", type=Path, default=ROOT / "evals/dev/tool_selection.jsonl")
    parser.add_argument("--heldout", type=Path, default=ROOT / "evals/datasets/tool_selection.jsonl")
    args = parser.parse_args()

    from server.embedder import Embedder, packaged_model_dir
    from server.handles import Late
    from server.toolcalls.registry import Registry
    from server.toolcalls.shortlist import Shortlister, ShortlistPolicy
    from server.toolcalls.spec import ToolSpec

    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    registry = Registry.load(["support"])
    tools = [ToolSpec(t.name, t.description, t.parameters, server=True, asks=tuple(t.asks)) for t in registry.packs["support"]]
    dev, heldout = load_cases(args.dev), load_cases(args.heldout)
    default = ShortlistPolicy()

    print(f"{'size':>4} {'margin':>6} {'id ±':>5} | {'dev top1':>8} {'recall':>6} {'offered':>7} | {'held-out top1':>13} {'recall':>6} {'offered':>7}")
    best = None
    for size, margin, weight in itertools.product((1, 2, 3), (0.0, 0.03, 0.05, 0.08, 0.12), (0.0, 0.1, 0.15, 0.25)):
        policy = ShortlistPolicy(size=size, margin=margin, id_found=weight, id_missing=weight)
        shortlister = Shortlister(Late(embedder), policy)
        d = await evaluate(shortlister, tools, dev)
        h = await evaluate(shortlister, tools, heldout)
        mark = " <- default" if policy == default else ""
        print(f"{size:>4} {margin:>6.2f} {weight:>5.2f} | {d[0]:>8.2f} {d[1]:>6.2f} {d[2]:>7.2f} | {h[0]:>13.2f} {h[1]:>6.2f} {h[2]:>7.2f}{mark}")
        # Chosen on dev only: highest recall, then fewest tools offered.
        key = (d[1], -d[2])
        if best is None or key > best[0]:
            best = (key, policy)
    assert best is not None
    print(f"best on dev: {best[1]}")
    for name, cases in (("dev", dev), ("held-out", heldout)):
        *_, misses = await evaluate(Shortlister(Late(embedder), default), tools, cases)
        print(f"default, {name} misses: {misses or 'none'}")


if __name__ == "__main__":
    asyncio.run(main())
