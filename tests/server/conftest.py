"""Fixtures the server tests share. A module that needs another engine or settings
defines its own `engine` or `api`, which wins over these."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.engine.scripted import ScriptedEngine


@pytest.fixture
def engine():
    """A scripted engine: replies queued by the test, calls recorded."""
    return ScriptedEngine(served_model="scripted", max_model_len=256)


@pytest.fixture
def api(engine, tmp_path):
    """The whole app on `engine` with default settings (the base rails) in a fresh data directory."""
    with TestClient(create_app(load_settings(data_dir=tmp_path), engine=engine)) as client:
        yield client
