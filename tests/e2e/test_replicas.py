"""Two Enclave replicas on loopback, as behind a load balancer: one PostgreSQL database,
one Chroma server, one vLLM-CPU server as the upstream of both remote engines, each with
its own (throw-away) data directory. Whatever one replica was told, the other knows.
Replica B reaches Chroma through a gateway that asks for a bearer token, as a shared
Chroma server is guarded in production; A reaches it directly.

PostgreSQL comes from ENCLAVE_TEST_POSTGRES_URL (`.ci/run` installs and starts it);
where none answers, this module is skipped with a message that says so."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from server.toolcalls.tenancy import tenant_database
from tests.conftest import POSTGRES_ADMIN_URL
from tests.e2e.conftest import (
    LiveServer,
    create_key,
    enclave,
    free_port,
    server_env,
    start,
    stop,
)
from tests.e2e.fleet import TokenGate, start_chroma, stop_process

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
SUPPORT = [{"type": "server", "name": "support"}]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, postgres_admin, vllm_upstream):
    work = tmp_path_factory.mktemp("replicas")
    name = "enclave_replicas_" + secrets.token_hex(4)
    with postgres_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    database_url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    chroma_port = free_port()
    chroma = start_chroma(work / "chroma", chroma_port, work / "chroma.log")
    gate = TokenGate(f"http://127.0.0.1:{chroma_port}", "chroma-" + secrets.token_hex(8))
    # One keys file, as a mounted secret would be; the support pack's backend (its
    # tenants' databases, the customer's system the tools act on) is shared like any backend.
    keys_dir = work / "keys"
    keys_dir.mkdir()
    keys = {
        "support": create_key(keys_dir, "--tenant", "acme", "--user", "cust_1001"),
        "operator": create_key(keys_dir, "--tenant", "acme", "--user", "ops", "--scope", "actions"),
    }
    common = {
        **server_env(),
        "ENCLAVE_DATABASE_URL": database_url,
        "ENCLAVE_CHROMA_URL": f"http://127.0.0.1:{chroma_port}",
        "ENCLAVE_UPSTREAMS": json.dumps([vllm_upstream.url]),
        "ENCLAVE_KEYS_FILE": str(keys_dir / "keys.json"),
        "ENCLAVE_PACK_DATA_DIR": str(work / "packs"),
        "ENCLAVE_TOOL_OPTIONS": json.dumps({"support": {"refund_limit": 50}}),
    }
    servers = []
    for label in ("a", "b"):
        data = work / label
        data.mkdir()
        port = free_port()
        env = {**common, "ENCLAVE_DATA_DIR": str(data)}
        if label == "b":
            env |= {"ENCLAVE_CHROMA_URL": gate.url, "ENCLAVE_CHROMA_TOKEN": gate.token}
        servers.append(LiveServer(f"http://127.0.0.1:{port}/v1", keys["support"], "", data, work / f"{label}.log", None, keys, port, env))  # type: ignore[arg-type]
    # Both start at once, as replicas of a rollout do: the schema is migrated once.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(start, servers))
    yield {"a": servers[0], "b": servers[1], "work": work, "database_url": database_url, "gate": gate}
    for server in servers:
        stop(server)
    gate.close()
    stop_process(chroma)
    vllm_upstream.ensure_running()
    with postgres_admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.keys["support"], max_retries=0, timeout=300)


def _refunds(work, order: str) -> int:
    path = tenant_database(work / "packs", "support", "acme")
    if not path.exists():  # no tool of the tenant has run yet: no refund either
        return 0
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM refunds WHERE order_id = ?", (order,)).fetchone()[0]


def test_a_conversation_goes_on_at_the_other_replica_with_its_history_and_memory(replicas):
    a, b = _client(replicas["a"]), _client(replicas["b"])
    first = a.responses.create(model=MODEL, instructions="You are a helpful support assistant.", input="Hello, my order number is 4471.", max_output_tokens=16, temperature=0)
    second = b.responses.create(model=MODEL, input="What was my order number?", previous_response_id=first.id, max_output_tokens=16, temperature=0)
    assert second.conversation.id == first.conversation.id
    assert second.model_extra["context_window"]["verbatim_turns"] == 1
    assert a.responses.retrieve(second.id).output_text == second.output_text

    # A fact told at A (its vectors in the Chroma server, its text in PostgreSQL) is
    # recalled at B, in a new conversation.
    a.responses.create(model=MODEL, input="Please deliver my parcels to my dog Biscuit's kennel.", max_output_tokens=8, temperature=0)
    recalled = b.responses.create(model=MODEL, input="What is the name of my dog?", max_output_tokens=16, temperature=0)
    assert any("Biscuit" in m["text"] for m in recalled.model_extra["recalled_memories"]), recalled.model_extra["recalled_memories"]
    server_b = replicas["b"]
    listed = httpx.get(f"{server_b.base_url}/memory", headers=server_b.headers(server_b.keys["support"])).json()["data"]
    assert any("Biscuit" in m["text"] for m in listed)
    # B read A's vectors through the gateway, with its token on every request.
    assert replicas["gate"].passed > 0 and replicas["gate"].refused == 0


def test_a_replica_without_the_right_chroma_token_stops_at_start_up_and_says_why(replicas):
    gate, b = replicas["gate"], replicas["b"]
    refused_before = gate.refused
    for token, says in (("chroma-wrong-0123456789", "refused ENCLAVE_CHROMA_TOKEN"), (None, "asks for credentials: set ENCLAVE_CHROMA_TOKEN")):
        env = {k: v for k, v in b.env.items() if k != "ENCLAVE_CHROMA_TOKEN"}
        env["ENCLAVE_DATA_DIR"] = str(replicas["work"] / "c")
        if token:
            env["ENCLAVE_CHROMA_TOKEN"] = token
        done = enclave("serve", "--port", str(free_port()), env=env, timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode != 0 and says in out and gate.url in out, out[-3000:]
        assert "Traceback" not in out and gate.token not in out and "chroma-wrong" not in out
    assert gate.refused == refused_before + 2


def test_a_file_uploaded_at_one_replica_is_read_at_the_other(replicas):
    a, b = replicas["a"], replicas["b"]
    headers = a.headers(a.keys["support"])
    up = httpx.post(f"{a.base_url}/files", headers=headers, files={"file": ("returns.md", b"# Returns\nReturns are free for 30 days.\n")}, data={"purpose": "assistants"})
    assert up.status_code == 200, up.text
    got = httpx.get(f"{b.base_url}/files/{up.json()['id']}/content", headers=headers)
    assert got.status_code == 200 and got.content == b"# Returns\nReturns are free for 30 days.\n"


def test_a_pending_refund_confirmed_at_both_replicas_at_once_runs_exactly_once(replicas):
    a, b = _client(replicas["a"]), _client(replicas["b"])
    before = _refunds(replicas["work"], "ORD-5001")
    asked = a.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Refund 10 EUR on order ORD-5001, I was charged twice."}],
        tools=SUPPORT,
        tool_choice={"type": "function", "function": {"name": "create_refund"}},
        temperature=0,
        max_tokens=120,
        extra_body={"conversation": "handoff"},
    )
    action = asked.model_extra["pending_action"]
    assert action and action["status"] == "pending", asked.model_dump()
    # The customer answers in the same conversation; the balancer sends the answer to
    # both replicas at once (a retried request). B knows the question only from the database.
    yes = {"model": "smollm2", "messages": [{"role": "user", "content": "Yes, go ahead."}], "tools": SUPPORT, "temperature": 0, "max_tokens": 40, "extra_body": {"conversation": "handoff"}}
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda c: c.chat.completions.create(**yes), (a, b)))
    assert {r.model_extra["pending_action"]["status"] for r in replies} == {"succeeded"}, [r.model_dump() for r in replies]
    assert {r.model_extra["pending_action"]["id"] for r in replies} == {action["id"]}
    assert _refunds(replicas["work"], "ORD-5001") == before + 1
    # And an operator approving at either replica afterwards changes nothing.
    for server in (replicas["a"], replicas["b"]):
        late = httpx.post(f"{server.root}/v1/actions/{action['id']}/approve", headers=server.headers(server.keys["operator"]), timeout=60)
        assert late.status_code == 200 and late.json()["status"] == "succeeded"
    assert _refunds(replicas["work"], "ORD-5001") == before + 1
    engine = create_engine(replicas["database_url"])
    with engine.connect() as conn:
        runs = conn.execute(text("SELECT COUNT(*) FROM tool_audit WHERE action_id = :a AND status = 'ok'"), {"a": action["id"]}).scalar()
    engine.dispose()
    assert runs == 1


def test_stopping_the_upstream_gives_both_replicas_a_clean_503_and_they_recover(replicas, vllm_upstream):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 4}
    vllm_upstream.stop()
    for server in (replicas["a"], replicas["b"]):
        r = httpx.post(f"{server.base_url}/chat/completions", headers=server.headers(), json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "upstream_unavailable" and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{server.root}/health", timeout=5).status_code == 200  # the replica itself stays up
    vllm_upstream.start()
    for server in (replicas["a"], replicas["b"]):
        deadline = time.monotonic() + 30  # health checks every 5 s
        while True:
            r = httpx.post(f"{server.base_url}/chat/completions", headers=server.headers(), json=body, timeout=60)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
