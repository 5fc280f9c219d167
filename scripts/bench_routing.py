"""What routing adds to a turn, measured side by side in one run.

One app with two scripted tiers (answers are instant, so the difference is the router's
own cost) serves the same turns asked for by model name and by the `auto` alias,
alternating in blocks: the alias pays for the classifier (one embedding of the user's
message with the local model) and, in a named conversation, the database lookups of the
conversation signals.

    python scripts/bench_routing.py --turns 200 --rounds 4 [--rails]

With --rails the turns also pass the guardrails, as deployed: the topic rail then reuses
the router's embedding of the message, so the router adds little beyond its lookups.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine
from server.profiles import ModelProfile

MESSAGES = ["Where is my parcel?", "This is the third time I am writing, I want a manager.", "How do I reset my password?", "Your refund never arrived."]


def block(client: TestClient, model: str, turns: int, offset: int) -> list[float]:
    times = []
    for i in range(turns):
        # Every message is new, as a user's are: no embedding is cached across turns.
        text = f"{MESSAGES[i % len(MESSAGES)]} (ticket T-{offset}{i:05d}, {model})"
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
        if i % 2:
            body["conversation"] = f"bench-{i % 8}"  # half the turns carry conversation signals
        started = time.perf_counter()
        r = client.post("/v1/chat/completions", json=body)
        times.append(time.perf_counter() - started)
        assert r.status_code == 200, r.text
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rails", action="store_true", help="run the guardrails too (as deployed)")
    args = parser.parse_args()
    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    with tempfile.TemporaryDirectory() as tmp:
        routing = {"tiers": {"small": "tier-small", "large": "tier-large"}}
        settings = load_settings(data_dir=Path(tmp), rails=args.rails, routing=routing)
        small = ScriptedEngine(served_model="tier-small", max_model_len=512)
        large = ScriptedEngine(served_model="tier-large", max_model_len=512)
        profile = ModelProfile(name="tier-large", source={"kind": "local_dir", "path": "-"}, context_length=512, device="cpu", tier="large", cost_per_hour=1.0)  # type: ignore[arg-type]
        with TestClient(create_app(settings, engine=small, embedder=embedder, others=[(profile, large)])) as client:
            results: dict[str, list[float]] = {"auto": [], "named": []}
            block(client, "auto", 20, 0)  # warm-up: the classifier embeds its examples once
            block(client, "tier-small", 20, 0)
            for r in range(args.rounds):
                order = ("auto", "named") if r % 2 == 0 else ("named", "auto")
                for mode in order:
                    results[mode] += block(client, "auto" if mode == "auto" else "tier-small", args.turns, r)
            routed = client.app.state.runtime.servings
            served = {name: len(s.engine.inner.calls) for name, s in routed.items()}
    p50 = {m: statistics.median(v) * 1000 for m, v in results.items()}
    p95 = {m: statistics.quantiles(v, n=20)[18] * 1000 for m, v in results.items()}
    print(f"rails {'on' if args.rails else 'off'}; turns per mode: {len(results['auto'])} (half in named conversations); model calls per tier: {served}")
    print(f"auto (routed): p50 {p50['auto']:.2f} ms  p95 {p95['auto']:.2f} ms")
    print(f"named model  : p50 {p50['named']:.2f} ms  p95 {p95['named']:.2f} ms")
    print(f"added per turn: p50 {p50['auto'] - p50['named']:+.2f} ms; ratio auto/named p50 {p50['auto'] / p50['named']:.3f}, p95 {p95['auto'] / p95['named']:.3f}")


if __name__ == "__main__":
    main()
