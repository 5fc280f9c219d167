"""The CI slice of the offline evals: `enclave eval` against the live server, its
report, and the deploy gate that fails a run on a regression."""

from __future__ import annotations

import json

import pytest

from evals.runner import DATASETS, load_cases
from tests.e2e.conftest import enclave

pytestmark = pytest.mark.e2e

CATEGORIES = {"tool_selection", "grounded", "memory", "must_refuse", "must_not_refuse", "off_topic", "json"}


def test_the_golden_set_covers_the_support_deployment():
    cases = load_cases([DATASETS])
    assert len(cases) >= 200
    assert {c["category"] for c in cases} == CATEGORIES
    assert all(c["expect"] for c in cases)


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    done = enclave("eval", "--base-url", "http://127.0.0.1:9/v1", "--per-category", "1", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2 and "enclave eval: error: http://127.0.0.1:9/v1" in done.stderr and "Traceback" not in done.stderr


def test_a_slice_runs_against_the_live_server_and_the_gate_catches_a_regression(live_server, tmp_path):
    out = tmp_path / "report"
    floor = tmp_path / "floor.json"
    floor.write_text(json.dumps({"overall": 0.0, "categories": {c: {"score": 0.0} for c in CATEGORIES}}))
    done = enclave(
        "eval", "--base-url", live_server.base_url, "--api-key", live_server.key, "--per-category", "2", "--concurrency", "4",
        "--out", str(out), "--baseline", str(floor), "--judge", env=live_server.env, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["cases"] == 14 and set(report["categories"]) == CATEGORIES
    for name, cat in report["categories"].items():
        assert cat["cases"] == 2 and 0.0 <= cat["score"] <= 1.0, name
        assert cat["latency_p50_s"] > 0
    # The rails are deterministic: off-topic requests are deflected, support questions
    # pass them (the model may still decline in its own words, which scores as a refusal).
    by_category = {}
    for r in report["results"]:
        by_category.setdefault(r["category"], []).append(r)
    assert all(r["finish_reason"] == "content_filter" for r in by_category["off_topic"])
    assert not any(r["finish_reason"] == "content_filter" for r in by_category["must_not_refuse"])
    # Every answered case was costed, and its trace is on the server.
    answered = [r for r in report["results"] if not r.get("error")]
    assert answered and all(r["cost_usd"] is not None and len(r["trace_id"]) == 32 for r in answered)
    assert report["comparison"]["regressions"] == []
    # The judge (the same local model, constrained JSON) gave verdicts on fact answers only.
    facts = [r for r in answered if r["category"] in ("grounded", "memory")]
    assert any(r["judge"] in (0.0, 1.0) for r in facts)
    assert all(r["judge"] is None for r in report["results"] if r["category"] not in ("grounded", "memory"))
    md = (out / "report.md").read_text()
    assert "| must_refuse | 2 |" in md and "No regression" in md
    for chart in ("scores_by_category.png", "latency_by_category.png", "cost_by_category.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same results against a baseline they fall short of: the gate fails the run.
    ceiling = tmp_path / "ceiling.json"
    ceiling.write_text(json.dumps({"overall": 1.0, "categories": {c: {"score": 1.0} for c in CATEGORIES}}))
    # (--z 0: two cases per category are too few for the noise allowance to mean anything.)
    gated = enclave("eval", "--rescore", str(out / "report.json"), "--baseline", str(ceiling), "--z", "0", "--out", str(tmp_path / "gated"), timeout=120)
    weak = [n for n, c in report["categories"].items() if c["score"] < 0.95]
    assert weak, "SmolLM2 is not perfect at everything"
    assert gated.returncode == 1 and "REGRESSION" in gated.stderr
    for name in weak:
        assert name in gated.stderr
    assert json.loads((tmp_path / "gated" / "report.json").read_text())["comparison"]["regressions"]


def test_the_batch_runner_gives_the_interactive_runners_report(live_server, tmp_path):
    """`enclave eval --batch` sends the same cases through /v1/batches (multi-turn cases
    as one batch per turn): the same scores, case by case."""
    runs = {}
    for mode in ("interactive", "batch"):
        out = tmp_path / mode
        done = enclave(
            "eval", "--base-url", live_server.base_url, "--api-key", live_server.key, "--per-category", "1", "--seed", "3",
            "--out", str(out), "--no-baseline", *(["--batch"] if mode == "batch" else []), env=live_server.env, timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[mode] = json.loads((out / "report.json").read_text())
    interactive, batch = runs["interactive"], runs["batch"]
    assert batch["run"]["batches"] and not interactive["run"]["batches"]
    assert len(batch["run"]["batches"]) >= 2  # the memory case's turns, one batch each
    assert {r["id"]: r["score"] for r in batch["results"]} == {r["id"]: r["score"] for r in interactive["results"]}
    assert {n: c["score"] for n, c in batch["categories"].items()} == {n: c["score"] for n, c in interactive["categories"].items()}
    assert all(r.get("latency_s") is None and r["cost_usd"] is not None for r in batch["results"] if not r.get("error"))
    assert "as " in (tmp_path / "batch" / "report.md").read_text() and "batches (" in (tmp_path / "batch" / "report.md").read_text()
