"""The eval set per model and per technique, side by side (evals/columns.py).

    python scripts/eval_matrix.py [--out evals/reports/matrix] [--only LABEL ...] [--reuse]

Each column is one `enclave eval --serve` run (a local server per run, one at a time:
two engines do not fit beside each other on a 2-core machine). A column that switches a
technique off runs only the categories that technique touches. The second model's
columns need its weights: `make setup MODEL=qwen2.5-coder-0.5b-instruct`. `--reuse` keeps
the reports a previous run left in --out and runs only the missing columns.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2 = {"ENCLAVE_MODEL": "smollm2-135m-instruct"}
QWEN = {"ENCLAVE_MODEL": "qwen2.5-coder-0.5b-instruct"}
TOOLS = ["tool_selection"]
ANSWERS = ["grounded", "memory"]
# (label, environment of its server, categories: None for all)
COLUMNS: list[tuple[str, dict[str, str], list[str] | None]] = [
    ("smollm2", SMOLLM2, None),
    ("smollm2 -shortlist", {**SMOLLM2, "ENCLAVE_TOOL_SHORTLIST": "0"}, TOOLS),
    ("smollm2 -grounding", {**SMOLLM2, "ENCLAVE_TOOL_GROUNDING": "false"}, TOOLS),
    ("smollm2 -source answers", {**SMOLLM2, "ENCLAVE_SOURCE_ANSWERS": "off"}, ANSWERS),
    ("qwen-0.5b", QWEN, None),
    ("qwen-0.5b +source answers", {**QWEN, "ENCLAVE_SOURCE_ANSWERS": "on"}, ANSWERS),
]


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def main() -> int:
    from evals import columns

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "evals" / "reports" / "matrix")
    p.add_argument("--only", nargs="+", help="run only these columns (labels); the table shows every report found")
    p.add_argument("--reuse", action="store_true", help="keep reports already in --out")
    args = p.parse_args()
    found = []
    for label, env, categories in COLUMNS:
        report = args.out / slug(label) / "report.json"
        wanted = args.only is None or label in args.only
        if wanted and not (args.reuse and report.exists()):
            cmd = [sys.executable, "-m", "server.cli", "eval", "--serve", "--no-baseline", "--out", str(report.parent)]
            for c in categories or []:
                cmd += ["--category", c]
            print(f"== {label}", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
            if done.returncode != 0:
                print(f"{label}: the eval run failed ({done.returncode})", file=sys.stderr)
                return done.returncode
        if report.exists():
            found.append(f"{label}={report}")
    if not found:
        print("no reports to put side by side", file=sys.stderr)
        return 1
    md, png = columns.write(args.out, columns.load(found))
    print(md.read_text())
    print(f"chart: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
