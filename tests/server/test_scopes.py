"""Scopes: every route of the app has its line in one table, and the table is what the
server enforces; "*" reaches no operator scope; an admin scope includes the one it widens."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from server.app import check_route_scopes, create_app
from server.auth import KeyStore, Principal
from server.config import load_settings
from server.engine.scripted import ScriptedEngine
from server.errors import ConfigError
from server.scopes import ADMIN_SCOPES, ANY_KEY, PUBLIC, ROUTE_SCOPES, default_scopes, grants


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(load_settings(data_dir=tmp_path_factory.mktemp("scopes")), engine=ScriptedEngine())


def test_every_route_has_a_scope_and_every_scope_a_route(app):
    declared = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods}
    assert declared == set(ROUTE_SCOPES)
    assert all(not isinstance(r, APIRoute) or r.dependant.dependencies for r in app.routes)
    public = {path for (_, path), scope in ROUTE_SCOPES.items() if scope == PUBLIC}
    # The probes, and the console's sign-in page and stylesheet (no session yet).
    assert public == {"/health", "/ready", "/console/login", "/console/static/console.css"}


def test_a_route_without_a_scope_stops_start_up(tmp_path):
    app = create_app(load_settings(data_dir=tmp_path), engine=ScriptedEngine())

    @app.get("/v1/forgotten")
    async def forgotten() -> dict:
        return {}

    with pytest.raises(ConfigError, match="GET /v1/forgotten"):
        check_route_scopes(app)
    keys = KeyStore(tmp_path / "keys.json")
    secret, _ = keys.create("acme", "alice", ["*", *ADMIN_SCOPES])
    with TestClient(app) as api:  # and were it served anyway, it stays closed
        refused = api.get("/v1/forgotten", headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "route_without_scope"


@pytest.mark.parametrize(
    ("held", "scope", "granted"),
    [
        (("*",), "chat", True),
        (("*",), "tools:support", True),
        (("*",), "actions", False),
        (("*",), "usage:admin", False),
        (("memory:*",), "memory:admin", False),
        (("tools:*",), "tools:billing", True),
        (("usage:admin",), "usage", True),
        (("memory:admin",), "memory", True),
        (("usage",), "usage:admin", False),
        (("chat",), "memory", False),
        (("traces",), "traces", True),
    ],
)
def test_grants(held, scope, granted):
    assert grants(held, scope) is granted
    assert Principal("t", "u", held).allows(scope) is granted


def test_a_new_keys_default_scopes_are_an_end_users():
    scopes = default_scopes(["support", "tests.e2e.faulty_tools"])
    assert scopes == ["chat", "embeddings", "models", "knowledge", "memory", "usage", "tools:support", "tools:faulty_tools"]
    assert not ADMIN_SCOPES & set(scopes)


def test_docs_open_only_when_the_setting_says_so(tmp_path):
    KeyStore(tmp_path / "keys.json").create("acme", "alice", ["chat"])
    for public, status in ((False, 401), (True, 200)):
        with TestClient(create_app(load_settings(data_dir=tmp_path, public_docs=public), engine=ScriptedEngine())) as api:
            assert api.get("/openapi.json").status_code == status
            assert api.get("/v1/models").status_code == 401
    assert ROUTE_SCOPES[("GET", "/openapi.json")] == ANY_KEY
