"""What tracing and cost accounting add to a turn, measured side by side in one run.

The same app serves the same turns twice over, alternating in blocks: once as deployed
(every turn traced, metered, costed and recorded in SQL) and once with telemetry
detached (no trace, no engine wrapper, no usage row). The ScriptedEngine answers
instantly, so the difference is the telemetry's own cost per turn, not the model's.

    python scripts/bench_telemetry.py --turns 200 --rounds 4

With `--against REF` it compares two versions of the server instead: the same turns (as
deployed, telemetry on) on this tree and on git revision REF, each in a process of its
own, alternating in blocks; the ratio says what a change cost per turn.

    python scripts/bench_telemetry.py --against HEAD~1 --turns 200 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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


def telemetry(chat, on: bool, parts: tuple) -> None:
    """Attach (as deployed) or detach the metered engine, tracing and accounting."""
    metered, tracing, accounting = parts
    engine = metered if on else metered.inner
    chat.engine = chat.generation.engine = chat.prompt.engine = engine
    chat.ledgers.tracing = tracing if on else None
    chat.ledgers.accounting = accounting if on else None


# The child of --against: the public API only, so that it runs on any revision.
_CHILD = """
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from fastapi.testclient import TestClient
from server.app import create_app
from server.config import load_settings
from server.engine.scripted import ScriptedEngine
body = {"model": "scripted", "messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 16}
with tempfile.TemporaryDirectory() as tmp:
    settings = load_settings(data_dir=Path(tmp), rails=False, cost_per_hour=1.0)
    with TestClient(create_app(settings, engine=ScriptedEngine([], served_model="scripted", max_model_len=512), embedder=None)) as client:
        for line in sys.stdin:
            turns, stream = json.loads(line)
            times = []
            for _ in range(turns):
                started = time.perf_counter()
                r = client.post("/v1/chat/completions", json={**body, "stream": stream})
                r.read()
                assert r.status_code == 200, r.text
                times.append(time.perf_counter() - started)
            print(json.dumps(times), flush=True)
"""


def compare(ref: str, turns: int, rounds: int) -> None:
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "tree"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(root), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {"this tree": root, ref: old}
        children = {name: subprocess.Popen([sys.executable, "-c", _CHILD, str(tree)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for name, tree in trees.items()}

        def run(name: str, n: int, stream: bool) -> list[float]:
            child = children[name]
            child.stdin.write(json.dumps([n, stream]) + "\n")  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
            return json.loads(child.stdout.readline())  # type: ignore[union-attr]

        results: dict[str, list[float]] = {name: [] for name in trees}
        for name in trees:
            run(name, 20, False)  # warm-up
        for r in range(rounds):
            for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                for stream in (False, True):
                    results[name] += run(name, turns // 2, stream)
        for child in children.values():
            child.stdin.close()  # type: ignore[union-attr]
            child.wait()
    p50 = {m: statistics.median(v) * 1000 for m, v in results.items()}
    p95 = {m: statistics.quantiles(v, n=20)[18] * 1000 for m, v in results.items()}
    print(f"turns per version: {len(results['this tree'])} (half streamed), telemetry on")
    for name in trees:
        print(f"{name:>10}: p50 {p50[name]:.2f} ms  p95 {p95[name]:.2f} ms")
    print(f"ratio this tree / {ref}: p50 {p50['this tree'] / p50[ref]:.3f}, p95 {p95['this tree'] / p95[ref]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--against", metavar="REF", help="compare this tree with a git revision instead")
    args = parser.parse_args()
    if args.against:
        compare(args.against, args.turns, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine = ScriptedEngine([], served_model="scripted", max_model_len=512)
        # Rails off: they would dominate the turn and are measured by bench_guard.py.
        settings = load_settings(data_dir=Path(tmp), rails=False, cost_per_hour=1.0)
        with TestClient(create_app(settings, engine=engine, embedder=None)) as client:
            chat = client.app.state.runtime.chat
            parts = (chat.engine, chat.ledgers.tracing, chat.ledgers.accounting)
            results: dict[str, list[float]] = {"on": [], "off": []}
            block(client, 20, False)  # warm-up
            for r in range(args.rounds):
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                for mode in order:
                    telemetry(chat, mode == "on", parts)
                    for stream in (False, True):
                        results[mode] += block(client, args.turns // 2, stream)
            telemetry(chat, True, parts)
    p50 = {m: statistics.median(v) * 1000 for m, v in results.items()}
    p95 = {m: statistics.quantiles(v, n=20)[18] * 1000 for m, v in results.items()}
    print(f"turns per mode: {len(results['on'])} (half streamed)")
    print(f"telemetry on : p50 {p50['on']:.2f} ms  p95 {p95['on']:.2f} ms")
    print(f"telemetry off: p50 {p50['off']:.2f} ms  p95 {p95['off']:.2f} ms")
    print(f"added per turn: p50 {p50['on'] - p50['off']:+.2f} ms; ratio on/off p50 {p50['on'] / p50['off']:.3f}, p95 {p95['on'] / p95['off']:.3f}")


if __name__ == "__main__":
    main()
