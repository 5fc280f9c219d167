"""The eval report: scores by category, latency and cost, the comparison with the
baseline, as Markdown, JSON and PNG charts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CATEGORY_ORDER = ["tool_selection", "grounded", "memory", "must_refuse", "must_not_refuse", "off_topic", "json"]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1 if q > 0 else 0)]


def _order(categories: list[str]) -> list[str]:
    return sorted(categories, key=lambda c: (CATEGORY_ORDER.index(c) if c in CATEGORY_ORDER else len(CATEGORY_ORDER), c))


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["category"], []).append(r)
    categories = {}
    for name in _order(list(by)):
        rs = by[name]
        latencies = [r["latency_s"] for r in rs if r.get("latency_s") is not None]
        costs = [r["cost_usd"] for r in rs if r.get("cost_usd") is not None]
        judged = [r["judge"] for r in rs if r.get("judge") is not None]
        scores = [r["score"] for r in rs]
        mean = sum(scores) / len(scores)
        categories[name] = {
            "cases": len(rs),
            "score": round(mean, 4),
            # Spread of the case scores: how far the mean can move between two runs by chance.
            "stdev": round(math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1)), 4) if len(scores) > 1 else 0.0,
            "passed": sum(1 for r in rs if r["score"] >= 1.0),
            "errors": sum(1 for r in rs if r.get("error")),
            "latency_p50_s": _quantile(latencies, 0.5),
            "latency_p95_s": _quantile(latencies, 0.95),
            "cost_usd": round(sum(costs), 8),
            "cost_per_case_usd": round(sum(costs) / len(costs), 10) if costs else None,
            "judge": round(sum(judged) / len(judged), 4) if judged else None,
        }
    overall = round(sum(c["score"] for c in categories.values()) / len(categories), 4) if categories else 0.0
    return {"categories": categories, "overall": overall, "cases": len(results), "cost_usd": round(sum(c["cost_usd"] for c in categories.values()), 8)}


def _paired_error(diffs: list[float]) -> float:
    """Standard error of the mean of per-case score changes."""
    if len(diffs) < 2:
        return 0.0
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def _unpaired_error(cat: dict[str, Any], base: dict[str, Any]) -> float:
    """Standard error of the difference of two means (a baseline without per-case scores)."""
    current = cat.get("stdev", 0.0) ** 2 / cat["cases"]
    before = base["stdev"] ** 2 / base["cases"] if "stdev" in base and base.get("cases") else current
    return math.sqrt(current + before)


def compare(summary: dict[str, Any], baseline: dict[str, Any], threshold: float, z: float = 2.0, results: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per category: the baseline's score, this run's and the change. A drop is a
    regression when it exceeds both the threshold and `z` standard errors of the
    change. At temperature 0 a batched engine still flips a few answers between
    identical runs (a category of 46 cases scoring 0.3 moved by up to 0.09 here), so
    the same cases are compared pair by pair with the baseline's: cases that never flip
    (the rails' verdicts, constrained JSON) add no noise and leave the threshold to
    decide; a category whose answers flip both ways is allowed that much more."""
    base_cases: dict[str, float] = baseline.get("cases") or {}
    by_category: dict[str, list[float]] = {}
    for r in results or []:
        if r["id"] in base_cases:
            by_category.setdefault(r["category"], []).append(r["score"] - base_cases[r["id"]])
    rows = {}
    regressions = []
    variance = 0.0  # of the change of the overall mean
    for name, cat in summary["categories"].items():
        base = baseline.get("categories", {}).get(name)
        if base is None:
            rows[name] = {"baseline": None, "score": cat["score"], "delta": None, "allowed": None}
            continue
        delta = round(cat["score"] - base["score"], 4)
        paired = by_category.get(name)
        error = _paired_error(paired) if paired else _unpaired_error(cat, base)
        variance += error**2
        allowed = round(max(threshold, z * error), 4)
        rows[name] = {"baseline": base["score"], "score": cat["score"], "delta": delta, "allowed": allowed, "paired": len(paired or [])}
        if delta < -allowed:
            regressions.append(f"{name} {base['score']:.3f} -> {cat['score']:.3f} (allowed drop {allowed:.3f})")
    overall_delta = round(summary["overall"] - baseline.get("overall", 0.0), 4)
    overall_allowed = round(max(threshold, z * math.sqrt(variance) / max(len(summary["categories"]), 1)), 4)
    if overall_delta < -overall_allowed:
        regressions.append(f"overall {baseline.get('overall', 0.0):.3f} -> {summary['overall']:.3f} (allowed drop {overall_allowed:.3f})")
    return {
        "threshold": threshold,
        "z": z,
        "categories": rows,
        "overall_delta": overall_delta,
        "overall_allowed": overall_allowed,
        "regressions": regressions,
        "baseline_model": baseline.get("model"),
    }


def _fmt(v: Any, pattern: str = "{:.3f}") -> str:
    return "–" if v is None else pattern.format(v)


def _sent(meta: dict[str, Any]) -> str:
    """How the cases were sent: one request each, or as batches (no latency then)."""
    batches = meta.get("batches") or []
    return f"as {len(batches)} batches ({', '.join(batches)})" if batches else f"concurrency {meta['concurrency']}"


def markdown(meta: dict[str, Any], summary: dict[str, Any], results: list[dict[str, Any]], comparison: dict[str, Any] | None) -> str:
    lines = [
        f"# Eval report: {meta['model']}",
        "",
        f"{meta['cases']} cases against `{meta['base_url']}`, {_sent(meta)}, {meta['duration_s']} s.",
        "",
        "| category | cases | score | passed | baseline | Δ | allowed drop | p50 latency | p95 latency | cost / case | judge |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in summary["categories"].items():
        row = comparison["categories"].get(name, {}) if comparison else {}
        lines.append(
            f"| {name} | {c['cases']} | {c['score']:.3f} | {c['passed']}/{c['cases']} | {_fmt(row.get('baseline'))} | {_fmt(row.get('delta'), '{:+.3f}')} | {_fmt(row.get('allowed'))} "
            f"| {_fmt(c['latency_p50_s'], '{:.2f} s')} | {_fmt(c['latency_p95_s'], '{:.2f} s')} | {_fmt(c['cost_per_case_usd'], '${:.7f}')} | {_fmt(c['judge'])} |"
        )
    lines += ["", f"**Overall (mean of categories): {summary['overall']:.3f}**" + (f" (Δ {comparison['overall_delta']:+.3f})" if comparison else ""), ""]
    lines.append(f"Total attributed engine cost: ${summary['cost_usd']:.6f}.")
    if comparison is not None:
        lines += [
            "",
            f"Gate: a category fails the run when it drops by more than {comparison['threshold']:.3f} and by more than "
            f"{comparison['z']:g} standard errors of its change, case by case against the baseline (the allowed drop); "
            f"so does the overall score (allowed drop {comparison['overall_allowed']:.3f}).",
        ]
        lines.append("**Regressions: " + "; ".join(comparison["regressions"]) + "**" if comparison["regressions"] else "No regression against the baseline.")
    failed = [r for r in results if r["score"] < 1.0]
    if failed:
        lines += ["", "## Cases below full score", "", "| case | score | note |", "|---|---|---|"]
        lines += [f"| {r['id']} | {r['score']:.2f} | {r['note'].replace('|', '/')} |" for r in sorted(failed, key=lambda r: r["id"])]
    lines += ["", "Charts: `scores_by_category.png`, `latency_by_category.png`, `cost_by_category.png`."]
    return "\n".join(lines) + "\n"


def charts(out: Path, summary: dict[str, Any], results: list[dict[str, Any]], baseline: dict[str, Any] | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    names = list(summary["categories"])
    paths: list[Path] = []

    def save(fig: Any, ax: Any, name: str) -> None:
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    scores = [summary["categories"][n]["score"] for n in names]
    bars = ax.bar(names, scores, color="#3b6ea5", label="this run")
    if baseline is not None:
        base = [baseline.get("categories", {}).get(n, {}).get("score") for n in names]
        xs = [i for i, b in enumerate(base) if b is not None]
        ax.scatter(xs, [base[i] for i in xs], marker="_", s=900, color="#d9534f", linewidths=3, label="baseline", zorder=3)
    for bar, s in zip(bars, scores, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, s + 0.02, f"{s:.2f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1.25)  # room above the bars for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("mean score")
    ax.set_title(f"Scores by category (overall {summary['overall']:.3f})")
    ax.legend(loc="upper left", ncol=2, frameon=False)
    save(fig, ax, "scores_by_category.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    data = [[r["latency_s"] for r in results if r["category"] == n and r.get("latency_s") is not None] or [0.0] for n in names]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("seconds per case (all turns)")
    ax.set_title("Latency by category")
    save(fig, ax, "latency_by_category.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    per_case = [(summary["categories"][n]["cost_per_case_usd"] or 0.0) * 1e6 for n in names]
    ax.bar(names, per_case, color="#5cb85c")
    ax.set_ylabel("micro-USD per case (attributed engine time)")
    ax.set_title(f"Cost by category (total ${summary['cost_usd']:.6f})")
    save(fig, ax, "cost_by_category.png")
    return paths


def write_report(
    out: Path, meta: dict[str, Any], summary: dict[str, Any], results: list[dict[str, Any]], comparison: dict[str, Any] | None, baseline: dict[str, Any] | None
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    report = {"run": meta, **summary, "comparison": comparison, "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown(meta, summary, results, comparison))
    images = charts(out, summary, results, baseline)
    return {"json": out / "report.json", "markdown": out / "report.md", "charts": images}  # type: ignore[dict-item]
