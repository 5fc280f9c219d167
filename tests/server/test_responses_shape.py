"""The Responses object is shaped twice for one turn (once to store, once to return); both
must be the same object, whatever the clock does between the two."""

from __future__ import annotations

import itertools

from server.memory.context import ContextRequest
from server.protocol import ResponsesRequest
from server.turn.encoders import responses_shape
from server.turn.encoders.responses_shape import ResponseShape


def test_the_stored_and_returned_response_share_one_completion_time(monkeypatch):
    clock = itertools.count(1_800_000_000)
    monkeypatch.setattr(responses_shape.time, "time", lambda: float(next(clock)))
    req = ResponsesRequest.model_validate({"model": "m", "input": "hi"})
    shape = ResponseShape(req, ContextRequest("", [{"role": "user", "content": "hi"}]), "resp_1", "m")
    assert shape.response("in_progress", [])["completed_at"] is None
    stored = shape.response("completed", [], finish="stop")
    returned = shape.response("completed", [], finish="stop")
    assert stored["completed_at"] == returned["completed_at"] > stored["created_at"]
    assert shape.response("completed", [], finish="length")["completed_at"] == stored["completed_at"]
