"""Property-based: requests generated from the server's own /openapi.json (schemathesis:
bodies, parameters and headers that fit the schema and that do not) never get a 5xx,
and every refusal has OpenAI's error shape. Bounded and derandomised, so a run is
repeatable; in process, on the ScriptedEngine, with the real embedder, rails, SQLite
and Chroma."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from server.app import create_app
from server.config import load_settings
from server.embedder import Embedder, packaged_model_dir
from server.engine.scripted import ScriptedEngine

EXAMPLES = 20


@pytest.fixture(scope="module")
def operations(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    app = create_app(load_settings(data_dir=data), engine=ScriptedEngine(served_model="scripted", max_model_len=512), embedder=embedder)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error(operations, mode):
    failures: list[str] = []
    statuses: list[int] = []
    for operation in operations:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy(generation_mode=mode))
        def check(case):
            response = case.call()
            statuses.append(response.status_code)
            where = f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:300]}\n{case.as_curl_command()}"
            assert response.status_code < 500, where
            if response.status_code >= 400:
                assert set(json.loads(response.text)["error"]) == {"message", "type", "param", "code"}, where

        try:
            check()
        except Unsatisfiable:
            continue  # an operation without parameters or body has no invalid request
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)
    # The run reached the routes' own logic, not only the validation in front of it.
    if mode == GenerationMode.POSITIVE:
        assert len(statuses) > 5 * len(operations) and statuses.count(200) > len(operations), sorted(statuses)
    else:
        assert len(statuses) > 2 * len(operations) and statuses.count(400) > len(operations), sorted(statuses)
