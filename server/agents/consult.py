"""A consultation: a specialist whose answer goes back to the agent that asked
(`answers: caller`), not to the user.

The specialist's turn is a whole turn of its own on its model's serving (the input
rails on the question, its tools through the executor, the output rails on its answer),
run to the end before the caller's turn is prepared. It is settled with the caller's
turn: its model calls are charged to that turn's ledger (the charge of the task), and
its tokens and engine time are the consulted agent's share of the usage rows. Its answer
reaches the caller as the result of an `ask_<agent>` call, which the tool-result rails
check like any tool's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from server.agents.config import AgentConfig
from server.auth import Principal
from server.ids import new_id
from server.protocol import ChatCompletionRequest
from server.telemetry import tracing
from server.telemetry.cost import Charge, current_charge
from server.turn.events import Kind
from server.turn.ledger import TurnLedger

# The specialist's answer is read by the caller, not shown: a few sentences.
MAX_ANSWER_TOKENS = 160


@dataclass
class Consultation:
    agent: str
    question: str
    answer: str = ""
    call_id: str = field(default_factory=lambda: new_id("tool_call"))
    refused: bool = False
    server_calls: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0

    @property
    def tool_name(self) -> str:
        return f"ask_{self.agent}"

    @property
    def arguments(self) -> str:
        return json.dumps({"question": self.question}, ensure_ascii=False)

    def public(self) -> dict[str, Any]:
        return {"agent": self.agent, "answer": self.answer, "refused": self.refused, "server_tool_calls": self.server_calls}


async def consult(serving: Any, agent: AgentConfig, tools: list[str], principal: Principal, question: str) -> Consultation:
    """Run `agent` on `question` with `tools` (the ones the key may use) on `serving`."""
    done = Consultation(agent.name, question)
    charge = current_charge.get()
    charged = charge.engine_seconds if charge is not None else 0.0
    body = ChatCompletionRequest.model_validate(
        {
            "model": serving.served_names[0],
            "messages": [{"role": "system", "content": agent.instructions}, {"role": "user", "content": question}],
            "tools": [{"type": "server", "name": name} for name in tools] or None,
            "max_tokens": MAX_ANSWER_TOKENS,
            "temperature": 0,
        }
    )
    with tracing.span(f"agent.consult {agent.name}", enclave__agent=agent.name) as span:
        turn = await serving.prepare(body, time.perf_counter(), principal)
        # Settled with the turn that consults: no usage row or trace of its own, and a
        # charge of its own to mark settled (the engine time is the task's charge's).
        turn.ledger = TurnLedger(serving.model, serving.metrics, None, None, Charge(), principal)
        run = serving.run(turn)
        async for ev in run.events:
            if ev.index == 0 and ev.kind is Kind.TEXT:
                done.answer += ev.text
        done.refused = turn.report.refusal is not None
        done.server_calls = [r.public() for r in turn.report.server_calls]
        done.prompt_tokens, done.completion_tokens = run.progress.billed
        if charge is not None:
            done.engine_seconds = charge.engine_seconds - charged
        tracing.set_attributes(span, gen_ai__usage__input_tokens=done.prompt_tokens, gen_ai__usage__output_tokens=done.completion_tokens, enclave__agent__refused=done.refused)
    return done
