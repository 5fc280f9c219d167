"""Compile the enabled tool packs' output constraints in the engine at start-up.

A tool set's constraint is compiled by the engine the first time a request uses it:
milliseconds with xgrammar, seconds with outlines (its index covers every token of the
vocabulary). The server's own packs are known in advance, so the server pays that before
it reports ready, and again after an engine restart, instead of the first user of each
pack paying it.

The whole pack's constraint is what a turn uses when every tool is offered (no shortlist,
or several tools equally close); a shortlisted or grounded turn compiles its narrower
constraint on first use (scripts/bench_shortlist.py measures the turn with it: no slower
to its first token than the plain one).
"""

from __future__ import annotations

import logging
import time

from server.engine.base import Engine, GenerationParams
from server.ids import internal_id
from server.toolcalls.constraint import build_constraint
from server.toolcalls.registry import Registry

log = logging.getLogger(__name__)


def pack_constraints(registry: Registry) -> dict[str, str]:
    """Each pack's constraint as a request naming it (`{"type": "server", "name": pack}`,
    tool_choice auto, parallel calls) makes it: the same regex, so the same cache entry."""
    return {
        pack: build_constraint([(t.name, t.parameters) for t in tools], allow_text=True, parallel=True).regex
        for pack, tools in registry.packs.items()
        if tools
    }


async def precompile(engine: Engine, registry: Registry) -> dict[str, float]:
    """Seconds each pack's constraint took to become ready in `engine` (one token each)."""
    prompt = engine.render_chat([{"role": "user", "content": "Hello"}])
    took: dict[str, float] = {}
    for pack, regex in pack_constraints(registry).items():
        started = time.perf_counter()
        try:
            params = GenerationParams(max_tokens=1, temperature=0.0, regex=regex)
            async for _ in engine.generate(internal_id(f"precompile-{pack}", short=True), prompt, params):
                pass
        except Exception:  # noqa: BLE001 - a failed warm-up costs the first request time, not the server
            log.warning("precompiling the constraint of tool pack %s failed; its first request compiles it", pack, exc_info=True)
            continue
        took[pack] = time.perf_counter() - started
    if took:
        log.info("tool-call constraints ready: %s", ", ".join(f"{p} {s:.2f} s" for p, s in took.items()))
    return took
