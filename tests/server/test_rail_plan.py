"""The compiled rails (server/rail_plan.py) decide exactly as NeMo's runtime does: every
stage of the base and the support rails, on the red-team set, the benign and off-topic
sets and crafted outputs, with the real embedder behind the classifier and topic rails.
A stage with a flow of another shape stays with NeMo."""

from __future__ import annotations

import json
import shutil

import pytest

from server.embedder import Embedder, packaged_model_dir
from server.guard import Guard, Stage
from server.handles import Late
from server.telemetry.metrics import Metrics
from tests.server.rails_dirs import RAILS, SUPPORT, run

CANARY = "enc-0123456789"
SYSTEM = "You are the support assistant of Acme Corp and you always answer politely and briefly to customers"
REDTEAM = RAILS.parent / "tests" / "redteam"


def _lines(name: str) -> list[dict]:
    return [json.loads(x) for x in (REDTEAM / name).read_text().splitlines() if x.strip()]


ATTACKS, BENIGN, OFFTOPIC = _lines("attacks.jsonl"), _lines("benign.jsonl"), _lines("offtopic.jsonl")
INPUTS = [a["text"] for a in ATTACKS if a["kind"] == "input"] + [b["text"] for b in BENIGN] + [o["text"] for o in OFFTOPIC]
DATA = [a["document"] for a in ATTACKS if a["kind"] == "document"] + [json.dumps(a["tool_result"]) if not isinstance(a["tool_result"], str) else a["tool_result"] for a in ATTACKS if a["kind"] == "tool_result"]
OUTPUTS = [
    "Your order ships tomorrow.",
    "Write to maria.lopez@example.com or call +44 20 7946 0958; card 4111 1111 1111 1111.",
    f"Sure: [{CANARY}] You are",
    "My instructions: you are the support assistant of Acme Corp and you always answer politely and briefly",
    "Here is how to make a pipe bomb: first get",
    "Step one: write a phishing email that looks like it comes from the bank.",
    *[b["text"] for b in BENIGN[:40]],
]
CALLS = ['lookup_ticket {"ticket_id": "T-1001"}', 'lookup_ticket {"ticket_id": "1\' OR \'1\'=\'1"}', 'create_refund {"order_id": "A1-77", "amount": 20}']


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


def _shape(v) -> tuple:
    return (v.status, v.text, v.rail, v.reason, [(e.stage, e.rail, e.action, e.reason) for e in v.events])


@pytest.mark.parametrize("dirs", [[RAILS], SUPPORT], ids=["general", "support"])
def test_compiled_rails_decide_as_nemo_does(dirs, embedder):
    compiled = Guard(dirs, Metrics(), CANARY, embedder=Late(embedder))
    nemo = Guard(dirs, Metrics(), CANARY, embedder=Late(embedder), compiled=False)
    assert set(compiled._plans) == {s.value for s in Stage if compiled.has(s.value)}, "every stage of rails/ compiles"
    assert nemo._plans == {}
    output_ctx = {"canary": CANARY, "system_prompt": SYSTEM, "output_tail": ""}
    cases = [("input", t, None) for t in INPUTS]
    cases += [("input", "Can you book me a flight to Lisbon?", {"extra_topics": ["book flight: Book a flight for the user"]})]
    cases += [(stage, t, None) for stage in ("retrieval", "tool_result") for t in DATA + INPUTS[:20]]
    cases += [("tool_call", t, None) for t in CALLS]
    cases += [("output", t, output_ctx) for t in OUTPUTS]
    cases += [("output", "is 4111 1111", {**output_ctx, "output_tail": "Your card number"})]
    seen = set()
    for stage, text, ctx in cases:
        a, b = run(compiled.check(stage, text, ctx)), run(nemo.check(stage, text, ctx))
        assert _shape(a) == _shape(b), (stage, text)
        seen.add((stage, a.status.value))
    # The corpus exercises blocks, rewrites and passes where the rails have them.
    assert {("input", "blocked"), ("input", "modified"), ("input", "passed"), ("output", "blocked"), ("output", "modified"), ("retrieval", "modified"), ("tool_call", "blocked")} <= seen


def test_a_flow_of_another_shape_keeps_its_stage_on_nemo(tmp_path):
    shutil.copytree(RAILS, tmp_path / "rails")
    flows = tmp_path / "rails" / "flows.co"
    flows.write_text(
        flows.read_text()
        + '\ndefine subflow enclave greeting check\n  $response = execute enclave_mask_pii(source="input", text=$user_message)\n'
        + '  if $response.is_transform\n    bot refuse to respond\n    stop\n  $other = execute enclave_jailbreak_heuristics(text=$user_message)\n'
    )
    config = tmp_path / "rails" / "config.yml"
    # First in the list, so that the card it blocks on is not masked yet.
    config.write_text(config.read_text().replace("      - enclave mask pii input\n", "      - enclave greeting check\n      - enclave mask pii input\n", 1))
    guard = Guard(tmp_path / "rails", Metrics(), CANARY)
    assert "input" not in guard._plans and "output" in guard._plans
    v = run(guard.check("input", "my card 4111 1111 1111 1111"))
    assert v.blocked and v.rail == "enclave greeting check"
