"""Eval reports as the console shows them: the runs `enclave eval` wrote under the
reports directory (one folder per run: report.json, report.md and PNG charts)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from server.errors import NotFoundError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def runs(root: Path) -> list[dict[str, Any]]:
    """Every readable run, newest first: when, which model, its overall score and gate."""
    out = []
    if not root.is_dir():
        return out
    for folder in root.iterdir():
        if not folder.is_dir() or not _NAME.match(folder.name):
            continue
        try:
            report = json.loads((folder / "report.json").read_text())
        except (OSError, ValueError):
            continue
        run = report.get("run") or {}
        comparison = report.get("comparison") or {}
        out.append(
            {
                "name": folder.name,
                "model": run.get("model"),
                "started": run.get("started") or 0,
                "cases": report.get("cases"),
                "overall": report.get("overall"),
                "overall_delta": comparison.get("overall_delta"),
                "regressions": len(comparison.get("regressions") or []),
                "compared": bool(comparison),
                "batches": len(run.get("batches") or []),
            }
        )
    return sorted(out, key=lambda r: (r["started"], r["name"]), reverse=True)


def folder(root: Path, name: str) -> Path:
    """A run's folder, by a name that can only be one of root's own children."""
    if not _NAME.match(name) or not (root / name / "report.json").is_file():
        raise NotFoundError(f"No eval report named {name!r}.", param="run")
    return root / name


def report(root: Path, name: str) -> dict[str, Any]:
    path = folder(root, name)
    data = json.loads((path / "report.json").read_text())
    data["charts"] = sorted(p.name for p in path.glob("*.png"))
    data["name"] = name
    return data


def chart(root: Path, name: str, chart_name: str) -> bytes:
    path = folder(root, name)
    if not _NAME.match(chart_name) or not chart_name.endswith(".png") or not (path / chart_name).is_file():
        raise NotFoundError(f"No chart {chart_name!r} in report {name!r}.", param="chart")
    return (path / chart_name).read_bytes()
