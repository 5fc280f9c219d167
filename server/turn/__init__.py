"""The turn pipeline: named stages over a typed per-turn state (see docs/architecture.md).

    dispatch.py      routing, the single fallback re-run, the ledger, preparation
    pipeline.py      ChatServing: one model's stages wired once, and their order
    state.py         TurnRequest (immutable), Turn (the stages' state), Progress
    events.py        TurnEvent, the one event type; Choice/Choices, the accumulators
    input_gate.py    input and tool-result rails, alongside prefill when safe
    ahead.py         a stream whose first event is asked for before it is read
    context.py       a stateful turn's context (history, memories, knowledge)
    prompt.py        rendering and output constraints
    generation.py    the engine call and one step's events
    decline_retry.py the model's own declines of benign requests: prevented, else retried
    tool_loop.py     server tools, repeats, the confirmation pause
    output_guard.py  output rails in checked windows
    guard_ledger.py  every rail's events, audited once
    ledger.py        admission, tracing and settling, once per turn
    encoders/        chat completions and Responses over the same events; one SSE skeleton
"""

from server.turn.pipeline import ChatServing

__all__ = ["ChatServing"]
