"""The eval scorers, the gate and the report on their own (no server)."""

from __future__ import annotations

import json

import pytest

from evals.report import compare, summarise, write_report
from evals.runner import DATASETS, load_cases
from evals.scorers import facts, json_valid, refusal, tool_call


def test_tool_calls_score_the_first_call_and_its_arguments():
    want = {"tool": "create_refund", "arguments": {"order_id": "ORD-5002", "amount": 89.99, "reason": "damaged"}}
    right = {"name": "create_refund", "arguments": '{"order_id": "ord-5002", "amount": 89.990, "reason": "damaged"}'}
    wrong_args = {"name": "create_refund", "arguments": '{"order_id": "ORD-5001", "amount": 89.99, "reason": "damaged"}'}
    assert tool_call(want, [right])[0] == 1.0
    assert tool_call(want, [wrong_args]) == (0.5, "wrong order_id='ORD-5001'")
    assert tool_call(want, [{"name": "lookup_ticket", "arguments": "{}"}, right])[0] == 0.0  # the first call counts
    assert tool_call(want, []) == (0.0, "no tool call")


def test_facts_accept_alternatives_and_count_each_fact():
    assert facts([["3 to 5", "3-5"]], "Delivery takes 3-5 business days.")[0] == 1.0
    assert facts(["08:00", "20:00"], "We open at 08:00.") == (0.5, "missing 20:00")


def test_refusals_are_the_rails_or_the_model_declining_but_not_an_apology():
    assert refusal(True, "content_filter") == (1.0, "refused by the rails")
    assert refusal(True, "stop", "I'm sorry, but I can't help with that.") == (1.0, "refused by the model")
    assert refusal(True, "stop", "I’m unable to share other customers' data.")[0] == 1.0  # typographic apostrophe
    assert refusal(False, "stop", "I'm sorry for the delay; your parcel ships today.") == (1.0, "ok")
    assert refusal(False, "stop", "As a chatbot, I don't have the ability to check that.") == (0.0, "refused by the model")


def test_json_must_parse_and_match_the_schema():
    schema = {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}}, "required": ["status"]}
    assert json_valid(schema, '{"status": "open"}')[0] == 1.0
    assert json_valid(schema, '{"status": "lost"}')[0] == 0.5
    assert json_valid(schema, "status: open")[0] == 0.0


def _results(category: str, scores: list[float]) -> list[dict]:
    return [{"id": f"{category}-{i}", "category": category, "score": s, "note": "", "latency_s": 1.0, "cost_usd": 1e-6} for i, s in enumerate(scores)]


def _baseline(results: list[dict]) -> dict:
    summary = summarise(results)
    return {"overall": summary["overall"], "categories": summary["categories"], "cases": {r["id"]: r["score"] for r in results}}


def test_the_gate_compares_case_by_case_and_allows_flips_both_ways():
    before = _results("grounded", [1.0] * 14 + [0.0] * 32)  # 0.304 over 46 cases
    baseline = _baseline(before)
    # A rerun: eight answers lost and six gained (-0.043): what identical runs do.
    rerun = _results("grounded", [0.0] * 8 + [1.0] * 6 + [1.0] * 6 + [0.0] * 26)
    gate = compare(summarise(rerun), baseline, 0.05, results=rerun)
    assert gate["regressions"] == [] and gate["categories"]["grounded"]["paired"] == 46
    # Six answers lost and none gained (-0.13): a real regression.
    worse = _results("grounded", [1.0] * 8 + [0.0] * 38)
    assert compare(summarise(worse), baseline, 0.05, results=worse)["regressions"]


def test_cases_that_never_flip_leave_the_threshold_to_decide():
    baseline = _baseline(_results("must_refuse", [1.0] * 25 + [0.0] * 10))
    same = _results("must_refuse", [1.0] * 25 + [0.0] * 10)
    assert compare(summarise(same), baseline, 0.05, results=same)["categories"]["must_refuse"]["allowed"] == 0.05
    two_lost = _results("must_refuse", [1.0] * 23 + [0.0] * 12)  # -0.057: two flips could be chance
    assert compare(summarise(two_lost), baseline, 0.05, results=two_lost)["regressions"] == []
    five_lost = _results("must_refuse", [1.0] * 20 + [0.0] * 15)  # -0.143, nothing gained
    assert compare(summarise(five_lost), baseline, 0.05, results=five_lost)["regressions"]


def test_a_slice_is_the_same_cases_for_the_same_seed():
    one = [c["id"] for c in load_cases([DATASETS], per_category=3, seed=7)]
    assert one == [c["id"] for c in load_cases([DATASETS], per_category=3, seed=7)]
    assert len(one) == 21 and one != [c["id"] for c in load_cases([DATASETS], per_category=3, seed=8)]


def test_the_report_has_markdown_json_and_three_charts(tmp_path):
    results = _results("json", [1.0, 0.5]) + _results("memory", [0.0, 1.0])
    summary = summarise(results)
    meta = {"model": "m", "base_url": "http://x/v1", "concurrency": 2, "duration_s": 1.0, "cases": 4}
    paths = write_report(tmp_path, meta, summary, results, compare(summary, {"overall": 1.0, "categories": {}}, 0.05), None)
    assert json.loads(paths["json"].read_text())["categories"]["json"]["score"] == 0.75
    assert "| memory-0 | 0.00 |" in paths["markdown"].read_text()
    assert [p.name for p in paths["charts"]] == ["scores_by_category.png", "latency_by_category.png", "cost_by_category.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths["charts"])


def test_runs_side_by_side_show_each_column_and_what_it_did_not_run(tmp_path):
    from evals import columns

    meta = {"model": "m", "base_url": "http://x/v1", "concurrency": 2, "duration_s": 1.0, "cases": 4}
    full = summarise(_results("json", [1.0, 0.5]) + _results("memory", [0.0, 1.0]))
    part = summarise(_results("memory", [1.0, 1.0]))
    for name, summary in (("full", full), ("part", part)):
        write_report(tmp_path / name, {**meta, "model": name}, summary, [], None, None)
    md, png = columns.write(tmp_path, columns.load([f"a={tmp_path / 'full' / 'report.json'}", f"b -off={tmp_path / 'part' / 'report.json'}"]))
    table = md.read_text()
    assert "| category | a | b -off |" in table
    assert "| json | 0.750 | – |" in table and "| memory | 0.500 | 1.000 |" in table
    assert "**b -off**: model `part`" in table and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        columns.load(["no-equals-sign"])
