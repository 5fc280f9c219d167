"""`enclave eval`: run the golden datasets against a server, score, report, gate.

    enclave eval --base-url http://gpu-box:8000/v1 --api-key sk-… --concurrency 8
    enclave eval --serve            # start a local server on the default model for the run
    enclave eval --serve --batch    # the same cases submitted through /v1/batches

Each case is sent the way an application would send it (chat completions, temperature 0):
tool cases with the support tool pack, grounded cases with the knowledge in
`evals/knowledge/` (uploaded once into a vector store), memory cases as a conversation.
With `--batch` the cases go to the server as batches (`/v1/batches`) instead: one batch
of every case's first request, then one of each conversation's next turn, and so on, so
a conversation's turns still run in order. The answers are scored by the same scorers
into the same report; only the per-request latency is not known (a batch's lines run
in the background), so the latency columns stay empty.
Scores go to a report (Markdown, JSON, PNG charts) and are compared with a baseline:
a category whose mean score drops by more than the threshold and more than chance
explains fails the run (exit 1), which is the deploy gate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATASETS = HERE / "datasets"
KNOWLEDGE = HERE / "knowledge"
BASELINE = HERE / "baseline.json"
KB_NAME = "enclave-eval-kb"
TOOL_PACK = "support"

# Tokens each kind of case may generate: enough for its answer, no more (CPU time).
MAX_TOKENS = {"tool_selection": 80, "grounded": 64, "memory": 48, "must_refuse": 32, "must_not_refuse": 48, "off_topic": 32, "json": 120}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=os.environ.get("ENCLAVE_URL", "http://127.0.0.1:8000/v1"), help="server base URL (ENCLAVE_URL)")
    p.add_argument("--api-key", default=os.environ.get("ENCLAVE_API_KEY"), help="API key (ENCLAVE_API_KEY); needs chat, tools:support and files scopes")
    p.add_argument("--model", help="model to evaluate (default: the server's first)")
    p.add_argument("--columns", nargs="+", metavar="LABEL=REPORT", help="no run: finished reports side by side (evals/columns.py)")
    p.add_argument("--datasets", type=Path, nargs="*", default=[DATASETS], help="JSONL files or directories of them")
    p.add_argument("--category", action="append", help="only these categories (repeatable)")
    p.add_argument("--per-category", type=int, help="a slice: at most this many cases per category (chosen by --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=Path("evals/reports") / time.strftime("%Y%m%d-%H%M%S"), help="report directory")
    p.add_argument("--baseline", type=Path, default=BASELINE, help="scores to compare with (the deploy gate)")
    p.add_argument("--no-baseline", action="store_true", help="report only, no gate")
    p.add_argument("--threshold", type=float, default=0.05, help="smallest drop of a category's mean score that can fail the run")
    p.add_argument("--z", type=float, default=2.0, help="a drop must also exceed this many standard errors of the case-by-case change (0: threshold only)")
    p.add_argument("--write-baseline", type=Path, help="store this run's scores as a baseline")
    p.add_argument("--judge", action="store_true", help="also grade fact answers with an LLM judge (local model)")
    p.add_argument("--judge-model", help="judge model (default: the evaluated model)")
    p.add_argument("--rescore", type=Path, help="re-score and re-compare an existing report.json instead of running")
    p.add_argument("--serve", action="store_true", help="start a local `enclave serve` (default model) for the run")
    p.add_argument("--batch", action="store_true", help="submit the cases through the Batch API (/v1/batches) instead of one request each")


# ---------------------------------------------------------------- cases


def load_cases(paths: list[Path], categories: list[str] | None = None, per_category: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    cases: list[dict[str, Any]] = []
    seen: set[str] = set()
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                case = json.loads(line)
            except ValueError as exc:
                raise SystemExit(f"{f.name}:{n}: not JSON: {exc}") from None
            if case["id"] in seen:
                raise SystemExit(f"{f.name}:{n}: duplicate case id {case['id']}")
            seen.add(case["id"])
            cases.append(case)
    if categories:
        cases = [c for c in cases if c["category"] in categories]
    if per_category:
        rng = random.Random(seed)
        by: dict[str, list[dict[str, Any]]] = {}
        for c in cases:
            by.setdefault(c["category"], []).append(c)
        cases = [c for group in by.values() for c in sorted(rng.sample(group, min(per_category, len(group))), key=lambda c: c["id"])]
    return cases


# ---------------------------------------------------------------- talking to the server


class Server:
    def __init__(self, base_url: str, api_key: str | None, timeout: float):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self.http.aclose()

    async def first_model(self) -> str:
        r = await self.http.get("/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    async def knowledge_store(self) -> str:
        """The eval knowledge base as a vector store, uploaded once and reused."""
        r = await self.http.get("/vector_stores", params={"limit": 100})
        r.raise_for_status()
        for store in r.json()["data"]:
            if store.get("name") == KB_NAME and store.get("file_counts", {}).get("completed") == len(list(KNOWLEDGE.glob("*.md"))):
                return store["id"]
        r = await self.http.post("/vector_stores", json={"name": KB_NAME})
        r.raise_for_status()
        store_id = r.json()["id"]
        for doc in sorted(KNOWLEDGE.glob("*.md")):
            up = await self.http.post("/files", files={"file": (doc.name, doc.read_bytes(), "text/markdown")}, data={"purpose": "assistants"})
            up.raise_for_status()
            added = await self.http.post(f"/vector_stores/{store_id}/files", json={"file_id": up.json()["id"]})
            added.raise_for_status()
            for _ in range(600):
                state = (await self.http.get(f"/vector_stores/{store_id}/files/{up.json()['id']}")).json()
                if state.get("status") != "in_progress":
                    break
                await asyncio.sleep(0.5)
            if state.get("status") != "completed":
                raise SystemExit(f"indexing {doc.name} failed: {state.get('last_error')}")
        return store_id

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One request; the outcome the scorers read, with latency, usage and cost."""
        started = time.perf_counter()
        r = await self.http.post("/chat/completions", json=body)
        latency = time.perf_counter() - started
        try:
            data = r.json()
        except ValueError:
            data = {"error": {"message": r.text[:200]}}
        return outcome(r.status_code, data, latency, r.headers.get("x-trace-id"))

    async def batch(self, bodies: dict[str, dict[str, Any]], poll_s: float = 1.0) -> tuple[str, dict[str, dict[str, Any]]]:
        """Chat-completion requests by custom id, run as one batch; its id and the
        outcome of each request, as `chat` gives them (without a latency)."""
        lines = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n" for cid, body in bodies.items())
        up = await self.http.post("/files", files={"file": ("eval-batch.jsonl", lines.encode(), "application/jsonl")}, data={"purpose": "batch"})
        up.raise_for_status()
        r = await self.http.post("/batches", json={"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        r.raise_for_status()
        batch = r.json()
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            await asyncio.sleep(poll_s)
            r = await self.http.get(f"/batches/{batch['id']}")
            r.raise_for_status()
            batch = r.json()
        if batch["status"] == "failed":
            raise SystemExit(f"batch {batch['id']} failed: {batch.get('errors')}")
        outcomes: dict[str, dict[str, Any]] = {}
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            content = await self.http.get(f"/files/{file_id}/content")
            content.raise_for_status()
            for row in content.text.splitlines():
                item = json.loads(row)
                response = item.get("response")
                if response is None:
                    outcomes[item["custom_id"]] = {"error": f"{(item.get('error') or {}).get('code')}: {(item.get('error') or {}).get('message')}", "latency_s": None}
                else:
                    outcomes[item["custom_id"]] = outcome(response["status_code"], response.get("body") or {}, None, None)
        for cid in bodies:
            outcomes.setdefault(cid, {"error": "the batch gave no answer for this request", "latency_s": None})
        return batch["id"], outcomes


def outcome(status: int, data: dict[str, Any], latency: float | None, trace_id: str | None) -> dict[str, Any]:
    """What the scorers read of one chat-completion answer, sent alone or in a batch."""
    if status != 200:
        try:
            message = data["error"]["message"]
        except (KeyError, TypeError):
            message = str(data)[:200]
        return {"error": f"{status}: {message}", "latency_s": latency}
    choice = data["choices"][0]
    message = choice["message"]
    calls = [{"name": c["name"], "arguments": c["arguments"], "status": c.get("status")} for c in data.get("server_tool_calls") or []]
    calls += [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message.get("tool_calls") or []]
    usage = data.get("usage") or {}
    return {
        "answer": message.get("content") or "",
        "finish_reason": choice.get("finish_reason"),
        "calls": calls,
        "rails": [f"{g['stage']}:{g['rail']}:{g['action']}" for g in data.get("guardrails") or []],
        "latency_s": latency,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "cost_usd": (data.get("cost") or {}).get("usd"),
        "trace_id": trace_id,
        # What the answer was chosen from, when the server built it from evidence.
        "source_answer": data.get("source_answer"),
    }


def case_requests(case: dict[str, Any], model: str, store: str | None, run_id: str) -> list[dict[str, Any]]:
    """The requests a case sends, in order: one, or one per turn of a conversation (the
    last may open a new conversation, so that only episodic memory can carry the fact)."""
    category = case["category"]
    base: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": case.get("max_tokens", MAX_TOKENS.get(category, 64))}
    if category == "tool_selection":
        base |= {"tools": [{"type": "server", "name": TOOL_PACK}], "tool_choice": "required"}
    if case.get("knowledge") and store:
        base["vector_store_ids"] = [store]
    if case.get("response_format"):
        base["response_format"] = case["response_format"]
    if "turns" not in case:
        return [{**base, "messages": case["messages"]}]
    conversation = f"eval-{run_id}-{case['id']}"
    requests = []
    for i, text in enumerate(case["turns"]):
        last = i == len(case["turns"]) - 1
        name = conversation + ("-b" if last and case.get("new_conversation_for_last") else "")
        requests.append({**base, "messages": [{"role": "user", "content": text}], "conversation": name})
    return requests


def combine(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """A case's outcome from its requests' (they stop at the first error): the last
    answer, with the latency and cost of them all."""
    latencies = [o["latency_s"] for o in outcomes if o.get("latency_s") is not None]
    cost = sum(o.get("cost_usd") or 0.0 for o in outcomes)
    return {**outcomes[-1], "latency_s": sum(latencies) if latencies else None, "cost_usd": cost}


async def run_case(server: Server, case: dict[str, Any], model: str, store: str | None, run_id: str) -> dict[str, Any]:
    outcomes: list[dict[str, Any]] = []
    for body in case_requests(case, model, store, run_id):
        outcomes.append(await server.chat(body))
        if outcomes[-1].get("error"):
            break
    return outcomes[0] if len(outcomes) == 1 else combine(outcomes)


async def run_batches(server: Server, cases: list[dict[str, Any]], model: str, store: str | None, run_id: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every case's outcome through the Batch API: wave k is one batch of each case's
    k-th request (a case whose earlier request failed sends no more)."""
    pending = {c["id"]: case_requests(c, model, store, run_id) for c in cases}
    outcomes: dict[str, list[dict[str, Any]]] = {cid: [] for cid in pending}
    batch_ids: list[str] = []
    wave = 0
    while True:
        bodies = {f"{cid}#{wave}": reqs[wave] for cid, reqs in pending.items() if len(reqs) > wave and not any(o.get("error") for o in outcomes[cid])}
        if not bodies:
            break
        print(f"  batch {wave + 1}: {len(bodies)} requests", file=sys.stderr)
        batch_id, got = await server.batch(bodies)
        batch_ids.append(batch_id)
        for key, result in got.items():
            outcomes[key.rsplit("#", 1)[0]].append(result)
        wave += 1
    return {cid: (o[0] if len(o) == 1 else combine(o)) for cid, o in outcomes.items()}, batch_ids


async def run(args: argparse.Namespace, cases: list[dict[str, Any]]) -> dict[str, Any]:
    from evals.judge import judge
    from evals.scorers import score

    server = Server(args.base_url, args.api_key, args.timeout)
    try:
        model = args.model or await server.first_model()
        store = await server.knowledge_store() if any(c.get("knowledge") for c in cases) else None
        run_id = secrets.token_hex(4)
        gate = asyncio.Semaphore(max(1, args.concurrency))
        done = 0
        started = time.time()

        async def one(case: dict[str, Any]) -> dict[str, Any]:
            nonlocal done
            async with gate:
                outcome = await run_case(server, case, model, store, run_id)
                value, note = score(case, outcome)
                judged = await judge(server.http, args.judge_model or model, case, outcome) if args.judge else None
            done += 1
            if done % 20 == 0 or done == len(cases):
                print(f"  {done}/{len(cases)} cases", file=sys.stderr)
            return {"id": case["id"], "category": case["category"], "score": value, "note": note, "judge": judged, **outcome}

        batch_ids: list[str] = []
        if args.batch:
            answered, batch_ids = await run_batches(server, cases, model, store, run_id)
            results = []
            for case in cases:
                value, note = score(case, answered[case["id"]])
                judged = await judge(server.http, args.judge_model or model, case, answered[case["id"]]) if args.judge else None
                results.append({"id": case["id"], "category": case["category"], "score": value, "note": note, "judge": judged, **answered[case["id"]]})
        else:
            results = await asyncio.gather(*(one(c) for c in cases))
        meta = {
            "base_url": args.base_url,
            "model": model,
            "started": started,
            "duration_s": round(time.time() - started, 1),
            "concurrency": args.concurrency,
            "cases": len(cases),
            "judge": bool(args.judge),
            "batches": batch_ids,  # empty: the cases were sent one request each
        }
        return {"run": meta, "results": list(results)}
    finally:
        await server.close()


# ---------------------------------------------------------------- a local server for the run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_server(deployment: str = "support") -> tuple[subprocess.Popen, str, str, Path]:
    """`enclave serve` on the default model in a fresh data directory, with a key that
    acts as the support pack's demo customer and tool rate limits the run cannot hit.
    The golden set is the support desk's (its topics, voice and tool pack)."""
    import httpx

    from server.auth import KeyStore

    data = Path(tempfile.mkdtemp(prefix="enclave-eval-"))
    key, _ = KeyStore(data / "keys.json").create("eval", "cust_1001", ["*"])
    port = _free_port()
    env = {
        **os.environ,
        "ENCLAVE_DATA_DIR": str(data),
        "HF_HUB_OFFLINE": "1",
        "ENCLAVE_DEPLOYMENT": deployment,
        # The canary is part of every prompt: a fixed one makes runs comparable across restarts.
        "ENCLAVE_RAILS_CANARY": "enc-e7a1c0ffee",
    }
    if deployment == "support":  # its tool pack: limits the run cannot hit
        env["ENCLAVE_TOOL_RATE_LIMITS"] = json.dumps({"create_refund": "10000/minute", "handoff_to_agent": "10000/minute", "lookup_ticket": "10000/minute"})
    log = (data / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {data / 'server.log'}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return proc, f"{base}/v1", key, data
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("the server did not become ready in 600 s")


def stop_local_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- entry point


def main(args: argparse.Namespace) -> int:
    import httpx

    from evals.report import compare, summarise, write_report

    if args.columns:
        from evals import columns

        md, png = columns.write(args.out, columns.load(args.columns))
        print(md.read_text())
        print(f"chart: {png}", file=sys.stderr)
        return 0
    if args.rescore:
        # The stored outcomes scored again with today's scorers and cases.
        from evals.scorers import score

        report = json.loads(args.rescore.read_text())
        results, meta = report["results"], report["run"]
        cases = {c["id"]: c for c in load_cases(args.datasets)}
        for r in results:
            if r["id"] in cases:
                r["score"], r["note"] = score(cases[r["id"]], r)
    else:
        cases = load_cases(args.datasets, args.category, args.per_category, args.seed)
        if not cases:
            print("enclave eval: no cases selected", file=sys.stderr)
            return 2
        proc = data = None
        if args.serve:
            print("starting a local server on the default model…", file=sys.stderr)
            proc, args.base_url, args.api_key, data = start_local_server()
        try:
            how = "as batches" if args.batch else f"concurrency {args.concurrency}"
            print(f"running {len(cases)} cases against {args.base_url} ({how})", file=sys.stderr)
            outcome = asyncio.run(run(args, cases))
        except httpx.HTTPError as exc:
            # Setting the run up failed (the server is unreachable, or refused the key).
            print(f"enclave eval: error: {args.base_url}: {exc}", file=sys.stderr)
            return 2
        finally:
            if proc is not None:
                stop_local_server(proc)
        if data is not None:
            shutil.rmtree(data, ignore_errors=True)  # kept only when the run failed, for its server log
        results, meta = outcome["results"], outcome["run"]
    summary = summarise(results)
    baseline = None if args.no_baseline or not args.baseline or not args.baseline.exists() else json.loads(args.baseline.read_text())
    comparison = compare(summary, baseline, args.threshold, args.z, results) if baseline is not None else None
    paths = write_report(args.out, meta, summary, results, comparison, baseline)
    print(paths["markdown"].read_text())
    if args.write_baseline:
        # Per-case scores too: the gate compares the same cases pair by pair.
        cases_scores = {r["id"]: r["score"] for r in sorted(results, key=lambda r: r["id"])}
        args.write_baseline.write_text(json.dumps({"model": meta["model"], "run": meta, **summary, "cases": cases_scores}, indent=2) + "\n")
        print(f"baseline written to {args.write_baseline}", file=sys.stderr)
    if comparison is not None and comparison["regressions"]:
        print("REGRESSION: " + "; ".join(comparison["regressions"]), file=sys.stderr)
        return 1
    return 0
