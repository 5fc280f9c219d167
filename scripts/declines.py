"""How often the model declines benign requests in its own words, with the decline stage
off and on, side by side (server/declines.py, rails/config.yml `model_declines`).

    python scripts/declines.py                                   # both deployments
    python scripts/declines.py --deployments support --split dev

Per deployment it starts a local server with the stage off (a copy of rails/ with
`model_declines.enabled: false`), one with the retry alone (`prevent: false`), then one
with the stage as shipped (declines prevented, and retried), and sends each the benign set's
requests of that deployment (evals/redteam/benign.jsonl; the held-out part by default,
which nothing was tuned on), streamed, at temperature 0 and 64 tokens. An answer declines
by the eval's definition (evals/scorers.py, which the server does not use) and by the
server's own (the stage's policy); it prints both, the share retried, the false refusals
of the rails, and time to first token and to the last token (p50, p95) with the ratio
to off: the stage holds text where a decline may be starting, and a retried answer is generated twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The stage off; on with the retry alone (`prevent: false`); on as shipped (prevention,
# and the retry for declines in other words).
MODES = ("off", "retry", "on")


def _requests(deployment: str, split: str | None) -> list[str]:
    from evals.redteam.corpora import split_of

    rows = [json.loads(line) for line in (ROOT / "evals" / "redteam" / "benign.jsonl").read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows if (deployment == "general" or r["deployment"] == "both") and (split is None or split_of("benign", r["text"]) == split)]


def _rails_with(into: Path, name: str, switch: str, value: str) -> Path:
    """A copy of rails/ with one switch of the `model_declines` block set."""
    rails = into / name
    shutil.copytree(ROOT / "rails", rails, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = rails / "config.yml"
    # Edited as text, so the copy keeps everything else as it is; only this block's switch.
    head, block = cfg.read_text().split("    model_declines:\n", 1)
    line = f"      {switch}: true\n"
    assert line in block, f"rails/config.yml: model_declines.{switch} not found"
    cfg.write_text(head + "    model_declines:\n" + block.replace(line, f"      {switch}: {value}\n", 1))
    return rails


async def _ask(client, model: str, text: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    answer, finish, guardrails = "", None, []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0, stream=True
    )
    async for chunk in stream:
        extra = chunk.model_extra or {}
        guardrails += extra.get("guardrails") or []
        if chunk.choices:
            delta = chunk.choices[0].delta.content or ""
            if delta and first is None:
                first = time.perf_counter() - started
            answer += delta
            finish = chunk.choices[0].finish_reason or finish
    return {"text": text, "answer": answer, "finish": finish, "ttft": first or 0.0, "e2e": time.perf_counter() - started, "guardrails": guardrails}


async def _run(base_url: str, key: str, texts: list[str], max_tokens: int, concurrency: int) -> list[dict]:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=300, max_retries=0) as client:
        model = (await client.models.list()).data[0].id
        gate = asyncio.Semaphore(concurrency)

        async def one(t: str) -> dict:
            async with gate:
                return await _ask(client, model, t, max_tokens)

        return await asyncio.gather(*(one(t) for t in texts))


def _summary(rows: list[dict]) -> dict:
    import yaml

    from evals.scorers import refused
    from server.declines import DeclinePolicy, Judgement

    policy = DeclinePolicy.from_config(yaml.safe_load((ROOT / "rails" / "config.yml").read_text())["custom_data"]["enclave"]["model_declines"])
    assert policy is not None
    answered = [r for r in rows if r["finish"] != "content_filter"]

    def q(values: list[float], p: float) -> float:
        return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else (values or [0.0])[0]

    return {
        "requests": len(rows),
        "refused_by_rails": len(rows) - len(answered),
        "declined_eval": sum(refused(None, r["answer"]) == "model" for r in answered),
        "declined_server": sum(policy.scan(r["answer"], final=True).judgement is Judgement.DECLINE for r in answered),
        "retried": sum(any(e.get("rail") == "model declines" for e in r["guardrails"]) for r in rows),
        "ttft_p50": q([r["ttft"] for r in answered], 50),
        "ttft_p95": q([r["ttft"] for r in answered], 95),
        "e2e_p50": q([r["e2e"] for r in answered], 50),
        "e2e_p95": q([r["e2e"] for r in answered], 95),
    }


def main() -> int:
    from evals.runner import start_local_server, stop_local_server

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deployments", default="general,support")
    p.add_argument("--split", choices=["heldout", "dev", "all"], default="heldout")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "evals" / "reports" / "declines.json")
    args = p.parse_args()
    split = None if args.split == "all" else args.split
    report: dict = {"split": args.split, "deployments": {}}
    scratch = Path(tempfile.mkdtemp(prefix="enclave-declines-"))
    try:
        rails = {"off": _rails_with(scratch, "off", "enabled", "false"), "retry": _rails_with(scratch, "retry", "prevent", "false"), "on": ROOT / "rails"}
        for deployment in args.deployments.split(","):
            texts = _requests(deployment, split)
            runs = {}
            for mode in MODES:
                os.environ["ENCLAVE_RAILS_DIR"] = str(rails[mode])
                print(f"{deployment}, stage {mode}: starting a local server…", file=sys.stderr)
                proc, base_url, key, data = start_local_server(deployment)
                try:
                    rows = asyncio.run(_run(base_url, key, texts, args.max_tokens, args.concurrency))
                finally:
                    stop_local_server(proc)
                    shutil.rmtree(data, ignore_errors=True)
                runs[mode] = {"summary": _summary(rows), "rows": rows}
            report["deployments"][deployment] = runs
            off, retry, on = (runs[m]["summary"] for m in MODES)
            print(f"\n{deployment}: {len(texts)} benign requests ({args.split}), {args.max_tokens} tokens, temperature 0")
            print("| | stage off | retry only | prevent + retry | retry/off | prevent/off |\n|---|---:|---:|---:|---:|---:|")
            for name, label in (("declined_eval", "declined (eval's definition)"), ("declined_server", "declined (server's definition)"),
                                ("retried", "retried"), ("refused_by_rails", "refused by the rails")):  # fmt: skip
                print(f"| {label} | {off[name]} | {retry[name]} | {on[name]} | | |")
            for name in ("ttft_p50", "ttft_p95", "e2e_p50", "e2e_p95"):
                ratios = " | ".join(f"{x[name] / off[name]:.2f}" if off[name] else "nan" for x in (retry, on))
                print(f"| {name} (ms) | {off[name] * 1000:.0f} | {retry[name] * 1000:.0f} | {on[name] * 1000:.0f} | {ratios} |")
    finally:
        os.environ.pop("ENCLAVE_RAILS_DIR", None)
        shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nreport: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
