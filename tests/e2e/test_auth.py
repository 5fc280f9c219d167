"""API keys on the live server: every route but /health and /ready needs one, and a key
reaches only what its scopes allow."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import create_key

pytestmark = pytest.mark.e2e


def test_health_and_ready_need_no_key(live_server):
    assert httpx.get(f"{live_server.root}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live_server.root}/ready").status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/metrics"])
def test_routes_without_key_are_401(live_server, path):
    response = httpx.get(f"{live_server.root}{path}")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


def test_wrong_key_is_401(live_server):
    bad = openai.OpenAI(base_url=live_server.base_url, api_key="sk-enclave-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_key_without_scope_is_403_but_works_in_scope(live_server):
    limited = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.embeddings_only_key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        limited.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert limited.embeddings.create(model="all-MiniLM-L6-v2", input="hi").data


def test_key_created_and_revoked_while_running_takes_effect(live_server):
    key = create_key(live_server.data_dir, "--tenant", "acme", "--user", "carol")
    fresh = openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0)
    assert fresh.models.list().data
    from server.auth import KeyStore

    store = KeyStore(live_server.data_dir / "keys.json")
    key_id = next(r["id"] for r in store.list() if r["user"] == "carol")
    assert store.revoke(key_id)
    with pytest.raises(openai.AuthenticationError):
        fresh.models.list()


def _get(live_server, path: str, key: str, **params) -> httpx.Response:
    return httpx.get(f"{live_server.root}{path}", headers=live_server.headers(key), params=params, timeout=60)


def test_a_key_made_without_scopes_is_an_end_users_not_an_operators(live_server):
    from server.auth import KeyStore

    record = next(r for r in KeyStore(live_server.data_dir / "keys.json").list() if r["user"] == "dora")
    assert set(record["scopes"]) == {"chat", "embeddings", "models", "knowledge", "memory", "usage", "tools:support"}
    key = live_server.keys["default"]
    user = openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0)
    assert user.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices
    assert _get(live_server, "/v1/memory", key).status_code == 200
    usage = _get(live_server, "/v1/usage", key, group_by="tenant").json()["data"]
    assert {b["tenant_id"] for b in usage} == {"acme"}  # its own tenant only
    refused = {
        "/metrics": _get(live_server, "/metrics", key),
        "/v1/actions": _get(live_server, "/v1/actions", key),
        "/v1/traces": _get(live_server, "/v1/traces/" + "0" * 32, key),
        "other user's memory": _get(live_server, "/v1/memory", key, user="dana"),
        "forget another user": httpx.delete(f"{live_server.base_url}/memory", params={"user": "dana"}, headers=live_server.headers(key)),
    }
    assert {what: r.status_code for what, r in refused.items()} == dict.fromkeys(refused, 403)
    assert refused["/v1/actions"].json()["error"]["code"] == "insufficient_scope"


def test_a_wildcard_key_gets_no_operator_scope_unless_named(live_server):
    key = create_key(live_server.data_dir, "--tenant", "acme", "--user", "legacy", "--scope", "*")
    assert _get(live_server, "/v1/models", key).status_code == 200
    assert _get(live_server, "/v1/actions", key).status_code == 403
    assert _get(live_server, "/metrics", key).status_code == 403


def test_usage_admin_alone_reads_every_tenant_and_users_are_keyed_by_tenant(live_server):
    for name in ("support", "beta"):  # acme's cust_1001 and beta's cust_1001
        openai.OpenAI(base_url=live_server.base_url, api_key=live_server.keys[name], max_retries=0).chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    admin = create_key(live_server.data_dir, "--tenant", "acme", "--user", "finance", "--scope", "usage:admin")
    by_tenant = _get(live_server, "/v1/usage", admin, group_by="tenant")
    assert by_tenant.status_code == 200 and {"acme", "beta"} <= {b["tenant_id"] for b in by_tenant.json()["data"]}
    users = _get(live_server, "/v1/usage", admin, group_by="user").json()["data"]
    same_name = sorted(b["tenant_id"] for b in users if b["user_id"] == "cust_1001")
    assert same_name == ["acme", "beta"]


def test_memory_routes_need_the_memory_scope(live_server):
    key = live_server.embeddings_only_key  # user bob, scope embeddings only
    assert _get(live_server, "/v1/memory", key).status_code == 403
    assert httpx.delete(f"{live_server.base_url}/memory", params={"user": "bob"}, headers=live_server.headers(key)).status_code == 403
    assert httpx.delete(f"{live_server.base_url}/memory/mem_x", headers=live_server.headers(key)).status_code == 403


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_api_docs_need_a_key_like_every_route(live_server, path):
    assert httpx.get(f"{live_server.root}{path}").status_code == 401
    assert _get(live_server, path, live_server.keys["default"]).status_code == 200


def test_every_route_but_health_and_ready_refuses_a_missing_key(live_server):
    spec = _get(live_server, "/openapi.json", live_server.key).json()
    for path, operations in spec["paths"].items():
        for method in operations:
            if path in ("/health", "/ready"):
                continue
            concrete = path.replace("{", "").replace("}", "")
            response = httpx.request(method.upper(), f"{live_server.root}{concrete}", timeout=30)
            assert response.status_code == 401, (method, path, response.status_code)
