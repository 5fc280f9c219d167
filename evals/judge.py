"""Optional LLM-as-judge on a local model: grades whether an answer states the expected
facts (or, for refusals, declines), as constrained JSON so its verdict always parses.
It complements the deterministic scorers (it accepts paraphrases they miss) and is
reported beside them, never instead of them: a small judge is itself noisy."""

from __future__ import annotations

import json
from typing import Any

import httpx

VERDICT = {
    "type": "object",
    "properties": {"correct": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 120}},
    "required": ["correct", "reason"],
    "additionalProperties": False,
}

PROMPT = """You grade a customer-support assistant's answer.
Question: {question}
Expected facts: {facts}
Answer: {answer}
Does the answer state the expected facts (paraphrases count)? Reply as JSON."""


async def judge(client: httpx.AsyncClient, model: str, case: dict[str, Any], outcome: dict[str, Any]) -> float | None:
    """1.0 or 0.0 by the judge; None when the case has no facts to judge or the judge
    gave no verdict (refused or failed)."""
    facts = case["expect"].get("facts")
    if not facts or outcome.get("error"):
        return None
    question = case["turns"][-1] if "turns" in case else case["messages"][-1]["content"]
    wanted = "; ".join(f if isinstance(f, str) else " or ".join(f) for f in facts)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT.format(question=question, facts=wanted, answer=outcome.get("answer") or "(empty)")}],
        "temperature": 0,
        "max_tokens": 80,
        "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}},
    }
    try:
        r = await client.post("/chat/completions", json=body)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        if choice.get("finish_reason") == "content_filter":
            return None
        return 1.0 if json.loads(choice["message"]["content"])["correct"] else 0.0
    except (httpx.HTTPError, ValueError, KeyError):
        return None
