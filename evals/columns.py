"""Eval runs side by side: one column per model or per server technique switched off.

    enclave eval --columns smollm2=evals/reports/m/smollm2/report.json \\
                           qwen-0.5b=evals/reports/m/qwen/report.json --out evals/reports/m

reads finished reports (report.json of `enclave eval`) and writes `columns.md` (a table:
categories by column, the held-out split of each run) and `columns.png` (grouped bars).
A column that ran only some categories shows "–" for the others: a run that switches one
technique off needs only the categories that technique touches.
`scripts/eval_matrix.py` runs the standard columns and calls this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evals.report import _order


def load(specs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """`label=path` pairs, each a report.json, in the order given."""
    columns = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--columns takes LABEL=REPORT.json, not {spec!r}")
        report = json.loads(Path(path).read_text())
        columns.append((label, report))
    return columns


def _categories(columns: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return _order(sorted({c for _, report in columns for c in report["categories"]}))


def table(columns: list[tuple[str, dict[str, Any]]]) -> str:
    names = _categories(columns)
    lines = [
        "# Eval columns",
        "",
        "Mean score per category of each run (`make eval` runs the held-out cases of `evals/datasets`).",
        "",
        "| category | " + " | ".join(label for label, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for n in names:
        cells = []
        for _, report in columns:
            cat = report["categories"].get(n)
            cells.append(f"{cat['score']:.3f}" if cat else "–")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| p50 latency (s), mean of categories | " + " | ".join(_latency(r) for _, r in columns) + " |")
    lines += ["", "Runs:", ""]
    for label, report in columns:
        run = report.get("run", {})
        lines.append(f"- **{label}**: model `{run.get('model', '?')}`, {run.get('cases', '?')} cases in {run.get('duration_s', 0):.0f} s")
    return "\n".join(lines) + "\n"


def _latency(report: dict[str, Any]) -> str:
    values = [c["latency_p50_s"] for c in report["categories"].values() if c.get("latency_p50_s") is not None]
    return f"{sum(values) / len(values):.2f}" if values else "–"


def chart(out: Path, columns: list[tuple[str, dict[str, Any]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _categories(columns)
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(9, 1.4 * len(names)), 4.8))
    for k, (label, report) in enumerate(columns):
        xs = [i + (k - (len(columns) - 1) / 2) * width for i, n in enumerate(names) if n in report["categories"]]
        ys = [report["categories"][n]["score"] for n in names if n in report["categories"]]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks(range(len(names)), names)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("mean score")
    ax.set_title("Scores by category, per model and technique")
    ax.legend(loc="upper left", ncol=min(len(columns), 4), frameon=False, fontsize=8)
    fig.tight_layout()
    path = out / "columns.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out: Path, columns: list[tuple[str, dict[str, Any]]]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "columns.md"
    md.write_text(table(columns))
    return md, chart(out, columns)
