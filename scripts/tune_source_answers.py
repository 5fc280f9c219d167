"""Chooses the source-answer settings (server/turn/source_answer.py) on the development
questions, from two eval runs of them:

    # every case answered from evidence, five candidates, the model's choice recorded:
    ENCLAVE_SOURCE_ANSWERS=on \\
    ENCLAVE_SOURCE_ANSWER_POLICY='{"candidates":5,"min_similarity":-1,"model_weight":1e-9}' \\
        enclave eval --serve --datasets evals/dev/grounded.jsonl evals/dev/memory.jsonl \\
        --no-baseline --out /tmp/dev-recorded
    # the same cases answered by the model in its own words:
    ENCLAVE_SOURCE_ANSWERS=off enclave eval --serve --datasets … --no-baseline --out /tmp/dev-free

    python scripts/tune_source_answers.py /tmp/dev-recorded/report.json /tmp/dev-free/report.json

Each setting is replayed from the recording: the candidates it would show, the sentence
it would choose (cosine plus model_weight × the model's probability, renormalised over
the candidates kept), or the free answer when the best cosine is below min_similarity;
the answer is scored as the eval scores it. A floor must also keep questions the
knowledge does not answer (`UNANSWERED`, written for this script) from being answered
with the nearest sentence: for each floor, the share of them whose best sentence in
evals/knowledge reaches it is printed as "false quotes". The held-out eval set is never
read here: run `make eval` with the chosen settings for its figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# Questions in the support scope that evals/knowledge does not answer.
UNANSWERED = [
    "Do you have a shop in Berlin I can visit?",
    "Can I pay with a voucher from my employer?",
    "Do you offer a student discount?",
    "Which phone models do you sell?",
    "Can I pick up my order in person?",
    "Is there a loyalty programme?",
    "Do you sell gift cards?",
    "Who is the CEO of your company?",
    "Can I get my invoice in French?",
    "Can I change the colour of an item after ordering?",
    "Do you price match other shops?",
    "Is my order insured during shipping?",
]
CANDIDATES = (1, 2, 3, 4, 5)
MIN_SIMILARITY = (-1.0, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
MODEL_WEIGHT = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def answer_text(c: dict) -> str:
    """The answer the server composes for a reported candidate."""
    from server.memory.evidence import Sentence
    from server.turn.source_answer import Chosen

    return Chosen(Sentence(c["text"], None if c["source"] == "user" else c["source"])).text()


def replay(recorded: dict, free: dict, k: int, floor: float, weight: float) -> str:
    sa = recorded.get("source_answer")
    if not sa or not sa.get("candidates"):
        return free.get("answer", "")
    cands = sa["candidates"][:k]
    if cands[0]["similarity"] < floor:
        return free.get("answer", "")
    probs = [c.get("p_model") or 0.0 for c in cands]
    total = sum(probs)
    probs = [p / total if total > 0 else 0.0 for p in probs]
    best = max(range(len(cands)), key=lambda i: cands[i]["similarity"] + (weight * probs[i] if k > 1 else 0.0))
    return answer_text(cands[best])


def unanswered_similarity() -> list[float]:
    """Each UNANSWERED question's best cosine to a sentence of the eval knowledge."""
    import asyncio

    from server.embedder import Embedder, packaged_model_dir
    from server.memory.evidence import knowledge_sentences

    class Doc:  # a whole document as one source: heading line, then its body
        def __init__(self, text: str):
            lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
            self.text = "\n" + " ".join(" ".join(lines).split())

    sentences = knowledge_sentences([Doc(p.read_text()) for p in sorted((ROOT / "evals/knowledge").glob("*.md"))])
    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")

    async def best() -> list[float]:
        vectors = await embedder.embed([s.text for s in sentences])
        return [float((vectors @ await embedder.embed_one(q)).max()) for q in UNANSWERED]

    return asyncio.run(best())


def main() -> None:
    from evals.scorers import score

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recorded", type=Path)
    parser.add_argument("free", type=Path)
    args = parser.parse_args()
    recorded = {r["id"]: r for r in json.loads(args.recorded.read_text())["results"]}
    free = {r["id"]: r for r in json.loads(args.free.read_text())["results"]}
    cases = {}
    for path in ("evals/dev/grounded.jsonl", "evals/dev/memory.jsonl"):
        for line in (ROOT / path).read_text().splitlines():
            if line.strip():
                case = json.loads(line)
                cases[case["id"]] = case
    ids = sorted(set(recorded) & set(free) & set(cases))
    categories = sorted({cases[i]["category"] for i in ids})

    def scores(k: int, floor: float, weight: float) -> dict[str, float]:
        per: dict[str, list[float]] = {c: [] for c in categories}
        for i in ids:
            answer = replay(recorded[i], free[i], k, floor, weight)
            per[cases[i]["category"]].append(score(cases[i], {"answer": answer, "finish_reason": "stop"})[0])
        return {c: sum(v) / len(v) for c, v in per.items()}

    free_scores = scores(1, 2.0, 0.0)  # a floor no cosine reaches: every answer free
    print("free answers:", "  ".join(f"{c} {s:.3f}" for c, s in free_scores.items()))
    unanswered = unanswered_similarity()

    def false_quotes(floor: float) -> float:
        return sum(b >= floor for b in unanswered) / len(unanswered)

    rows = []
    for k, floor, weight in itertools.product(CANDIDATES, MIN_SIMILARITY, MODEL_WEIGHT):
        if k == 1 and weight > 0:
            continue
        s = scores(k, floor, weight)
        rows.append((sum(s.values()) / len(s), k, floor, weight, s))
    # Best mean first; among ties the fewest false quotes, then the simplest setting
    # (fewer candidates, no model step).
    rows.sort(key=lambda r: (-round(r[0], 6), false_quotes(r[2]), r[1], r[3]))
    print(f"{'mean':>6}  {'k':>2}  {'floor':>6}  {'weight':>6}  " + "  ".join(f"{c:>9}" for c in categories) + "  false quotes")
    for mean, k, floor, weight, s in rows[:15]:
        print(f"{mean:6.3f}  {k:2d}  {floor:6.2f}  {weight:6.2f}  " + "  ".join(f"{s[c]:9.3f}" for c in categories) + f"  {false_quotes(floor):12.2f}")


if __name__ == "__main__":
    main()
