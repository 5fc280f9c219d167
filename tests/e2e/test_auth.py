"""API keys on the live server: every route but /health and /ready needs one."""

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
