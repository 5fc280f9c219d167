"""What tracing and cost accounting add to a turn, measured side by side in one run.

The same app serves the same turns twice over, alternating in blocks: once as deployed
(every turn traced, metered, costed and recorded in SQL) and once with telemetry
detached (no trace, no engine wrapper, no usage row). The ScriptedEngine answers
instantly, so the difference is the telemetry's own cost per turn, not the model's.

    python scripts/bench_telemetry.py --turns 200 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402

from server.app import create_app  # noqa: E402
from server.config import load_settings  # noqa: E402
from server.engine.scripted import ScriptedEngine  # noqa: E402


def block(client: TestClient, turns: int, stream: bool) -> list[float]:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 16, "stream": stream}
    times = []
    for _ in range(turns):
        started = time.perf_counter()
        r = client.post("/v1/chat/completions", json=body)
        if stream:
            r.read()
        times.append(time.perf_counter() - started)
        assert r.status_code == 200, r.text
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = ScriptedEngine([], served_model="scripted", max_model_len=512)
        # Rails off: they would dominate the turn and are measured by bench_guard.py.
        settings = load_settings(data_dir=Path(tmp), rails=False, cost_per_hour=1.0)
        with TestClient(create_app(settings, engine=engine, embedder=None)) as client:
            chat = client.app.state.runtime.chat
            on = (chat.engine, chat.tracing, chat.accounting)
            off = (chat.engine.inner, None, None)
            results: dict[str, list[float]] = {"on": [], "off": []}
            block(client, 20, False)  # warm-up
            for r in range(args.rounds):
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                for mode in order:
                    chat.engine, chat.tracing, chat.accounting = on if mode == "on" else off
                    for stream in (False, True):
                        results[mode] += block(client, args.turns // 2, stream)
            chat.engine, chat.tracing, chat.accounting = on
    p50 = {m: statistics.median(v) * 1000 for m, v in results.items()}
    p95 = {m: statistics.quantiles(v, n=20)[18] * 1000 for m, v in results.items()}
    print(f"turns per mode: {len(results['on'])} (half streamed)")
    print(f"telemetry on : p50 {p50['on']:.2f} ms  p95 {p95['on']:.2f} ms")
    print(f"telemetry off: p50 {p50['off']:.2f} ms  p95 {p95['off']:.2f} ms")
    print(f"added per turn: p50 {p50['on'] - p50['off']:+.2f} ms; ratio on/off p50 {p50['on'] / p50['off']:.3f}, p95 {p95['on'] / p95['off']:.3f}")


if __name__ == "__main__":
    main()
