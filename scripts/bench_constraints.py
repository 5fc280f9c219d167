"""Cold compile of tool-call constraints, by structured-output backend and vocabulary.

    python scripts/bench_constraints.py [--rounds 3]

The constraints are the regexes the server sends (server/toolcalls/constraint.py): the
support pack's whole tool set under `tool_choice: auto`, and ten ordinary function
schemas, one request each. Each is compiled cold (no cache) by:

* outlines: outlines-core's token index over the whole vocabulary (vLLM's `outlines`
  backend, the server's default), built before the first token;
* xgrammar: the compiled grammar plus the first token mask (vLLM's `xgrammar`);
* guidance: llguidance's matcher plus the first token mask (vLLM's `guidance`).

Vocabularies: SmolLM2's own tokenizer (49,152 tokens) and Mistral's Tekken tokenizer
(131,072 tokens) as the mistral_common package ships it, a stand-in for Llama 3's 128k.
Decoding cost too: each backend's mask filling plus advancing, per generated token, over
a tool call and a prose answer. Then outlines' on-disk cache (what a restarted server
reads instead of compiling again).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.toolcalls.constraint import build_constraint  # noqa: E402

ORDINARY = [
    ("get_weather", {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}),
    ("search_web", {"type": "object", "properties": {"query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1, "maximum": 20}}, "required": ["query"]}),
    ("send_email", {"type": "object", "properties": {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}}, "required": ["to", "subject", "body"]}),
    ("create_event", {"type": "object", "properties": {"title": {"type": "string"}, "start": {"type": "string", "format": "date-time"}, "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480}}, "required": ["title", "start"]}),
    ("convert_currency", {"type": "object", "properties": {"amount": {"type": "number", "minimum": 0}, "from": {"type": "string"}, "to": {"type": "string"}}, "required": ["amount", "from", "to"]}),
    ("lookup_order", {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}}, "required": ["order_id"]}),
    ("set_reminder", {"type": "object", "properties": {"text": {"type": "string"}, "when": {"type": "string"}, "repeat": {"type": "boolean"}}, "required": ["text", "when"]}),
    ("translate", {"type": "object", "properties": {"text": {"type": "string"}, "target_language": {"type": "string", "enum": ["en", "fr", "de", "es", "it", "pt", "nl"]}}, "required": ["text", "target_language"]}),
    ("add_items", {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}, "required": ["sku", "qty"]}}}, "required": ["items"]}),
    ("rate_answer", {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": {"type": "string"}}, "required": ["score"]}),
]


def support_regex() -> str:
    from server.config import load_settings
    from server.toolcalls.registry import Registry

    registry = Registry.load(["support"], load_settings(data_dir=Path(tempfile.mkdtemp())))
    tools = registry.resolve("support", param="tools")
    return build_constraint([(t.name, t.parameters) for t in tools], allow_text=True, parallel=True).regex


def cases() -> list[tuple[str, str]]:
    out = [("support pack", support_regex())]
    out += [(name, build_constraint([(name, schema)], allow_text=True, parallel=True).regex) for name, schema in ORDINARY]
    return out


def tokenizers() -> list[tuple[str, object]]:
    import mistral_common
    from transformers import AutoTokenizer
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    from server.checkpoints import checkpoint_dir
    from server.config import load_settings
    from server.profiles import find_profile

    settings = load_settings()
    smol = AutoTokenizer.from_pretrained(str(checkpoint_dir(find_profile(settings.profiles_dir, "smollm2"), settings.models_dir)))
    tekken = convert_tekken_tokenizer(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json"))
    return [(f"SmolLM2 {len(smol.get_vocab()):,}", smol), (f"Tekken {len(tekken.get_vocab()):,}", tekken)]


class Outlines:
    name = "outlines"

    def __init__(self, tokenizer):
        import outlines_core as oc

        from vllm.v1.structured_output.utils import get_outlines_vocabulary

        self.oc = oc
        self.vocab = get_outlines_vocabulary(tokenizer)
        self.size = len(tokenizer.get_vocab())

    def compile(self, regex: str):
        return self.oc.Index(regex, self.vocab.inner)

    def steps(self, regex: str):
        """(fill the next-token mask, advance by a token), as vLLM's backend does."""
        import torch

        guide = self.oc.Guide(self.compile(regex))
        mask = torch.zeros((self.size + 31) // 32, dtype=torch.int32)
        return (lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())), guide.advance


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer.get_vocab()))

    def compile(self, regex: str):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        matcher = self.xgr.GrammarMatcher(compiler.compile_regex(regex))
        mask = self.xgr.allocate_token_bitmask(1, self.info.vocab_size)
        matcher.fill_next_token_bitmask(mask)
        return matcher

    def steps(self, regex: str):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        matcher = self.xgr.GrammarMatcher(compiler.compile_regex(regex))
        mask = self.xgr.allocate_token_bitmask(1, self.info.vocab_size)
        return (lambda: matcher.fill_next_token_bitmask(mask)), matcher.accept_token


class Guidance:
    name = "guidance"

    def __init__(self, tokenizer):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, len(tokenizer.get_vocab()))

    def compile(self, regex: str):
        import llguidance.torch

        matcher = self.ll.LLMatcher(self.tokenizer, self.ll.grammar_from("regex", regex))
        mask = llguidance.torch.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        return matcher

    def steps(self, regex: str):
        import llguidance.torch

        matcher = self.ll.LLMatcher(self.tokenizer, self.ll.grammar_from("regex", regex))
        mask = llguidance.torch.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        return (lambda: llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)), matcher.consume_token


# Outputs each constraint admits, for the per-token cost: a call and an answer in prose.
OUTPUTS = {
    "support pack": ['[{"name":"lookup_ticket","arguments":{"ticket_id":"T-1001"}}]', "Your ticket is open and an agent will reply within a day."],
    "get_weather": ['[{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}]', "It is sunny in Paris today, with a light breeze."],
}


def per_token_us(backend, tokenizer, constraints: dict[str, str]) -> float:
    """Mean microseconds per generated token of mask filling plus advancing."""
    import re

    total, tokens = 0.0, 0
    for name, outputs in OUTPUTS.items():
        for text in outputs:
            assert re.fullmatch(constraints[name], text), (name, text)
            ids = tokenizer.encode(text, add_special_tokens=False)
            fill, advance = backend.steps(constraints[name])
            started = time.perf_counter()
            for token in ids:
                fill()
                advance(token)
            total += time.perf_counter() - started
            tokens += len(ids)
    return total / tokens * 1e6


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def disk_cache(tokenizer, regexes: list[str]) -> tuple[list[float], list[float]]:
    """Compile into vLLM's on-disk outlines cache (what the server keeps across restarts),
    then read each back as a restarted server does: (cold compiles, reads)."""
    from vllm.v1.structured_output.utils import OutlinesDiskCache

    backend = Outlines(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        cache = OutlinesDiskCache(tmp)
        cold, warm = [], []
        for regex in regexes:
            started = time.perf_counter()
            cache[regex] = backend.compile(regex)
            cold.append(time.perf_counter() - started)
        reopened = OutlinesDiskCache(tmp)
        for regex in regexes:
            warm.append(timed(lambda r: reopened[r], regex))
    return cold, warm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="cold compiles of each constraint per backend")
    args = p.parse_args()
    constraints = cases()
    print(f"{len(constraints)} constraints; regex length {min(len(r) for _, r in constraints):,}-{max(len(r) for _, r in constraints):,} characters")
    for vocab_name, tokenizer in tokenizers():
        print(f"\n{vocab_name} tokens: cold compile seconds, p50 / p95 / max over {len(constraints)} constraints x {args.rounds} rounds")
        results: dict[str, list[float]] = {}
        for backend_cls in (Outlines, XGrammar, Guidance):
            backend = backend_cls(tokenizer)
            times = [timed(backend.compile, regex) for _ in range(args.rounds) for _, regex in constraints]
            results[backend.name] = times
            support = statistics.median(timed(backend.compile, constraints[0][1]) for _ in range(args.rounds))
            per_token = per_token_us(backend, tokenizer, dict(constraints))
            print(f"  {backend.name:9} {pct(times, 0.5):7.3f} / {pct(times, 0.95):7.3f} / {max(times):7.3f}   (support pack: {support:.3f}; decoding: {per_token:.0f} us per token)")
        base = pct(results["outlines"], 0.95)
        print("  p95 ratio to outlines: " + ", ".join(f"{name} {pct(t, 0.95) / base:.3f}" for name, t in results.items()))
        cold, warm = disk_cache(tokenizer, [regex for _, regex in constraints])
        print(f"  outlines from the on-disk cache after a restart: p95 {pct(warm, 0.95) * 1000:.1f} ms (cold p95 {pct(cold, 0.95):.3f} s; ratio {pct(warm, 0.95) / pct(cold, 0.95):.4f})")


if __name__ == "__main__":
    main()
