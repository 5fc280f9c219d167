"""RemoteEngine's orchestration against fake OpenAI-compatible upstreams (httpx
MockTransport): the request it sends, least-outstanding choice, retry before the first
token, health checks, and errors. The real upstream (vLLM's own server) is exercised
end to end separately."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server.engine.base import GenerationParams
from server.engine.remote import RemoteEngine
from server.errors import EngineError, InvalidRequestError, ServiceUnavailableError


def _sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


REPLY = _sse(
    {"choices": [{"index": 0, "text": "Hello", "token_ids": [11], "finish_reason": None}]},
    {"choices": [{"index": 0, "text": " world", "token_ids": [12], "finish_reason": "stop", "stop_reason": None}]},
)


class Fleet:
    """Upstreams by host: "ok", "refuse" (connection refused), "500", "400", "break"
    (dies after the first token); /health answers 200 when the mode is "ok"."""

    def __init__(self, **modes: str):
        self.modes = modes
        self.bodies: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        mode = self.modes[host]
        if request.url.path == "/health":
            if mode == "refuse":
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(200 if mode == "ok" else 503)
        if mode == "refuse":
            raise httpx.ConnectError("refused", request=request)
        self.bodies.append((host, json.loads(request.content)))
        if mode == "500":
            return httpx.Response(500, json={"error": {"message": "engine dead"}})
        if mode == "400":
            return httpx.Response(400, json={"error": {"message": "This model's maximum context length is 2048 tokens."}})
        if mode == "break":
            return httpx.Response(200, stream=_Breaking())
        return httpx.Response(200, content=REPLY, headers={"content-type": "text/event-stream"})


class _Breaking(httpx.AsyncByteStream):
    async def __aiter__(self):
        yield b'data: {"choices": [{"index": 0, "text": "Hel", "token_ids": [11], "finish_reason": null}]}\n\n'
        raise httpx.ReadError("connection reset")


def engine_for(fleet: Fleet, *hosts: str) -> RemoteEngine:
    return RemoteEngine([f"http://{h}/v1" for h in hosts], "upstream-model", "served", None, 2048, transport=httpx.MockTransport(fleet), health_interval_s=3600)


async def _collect(engine: RemoteEngine, params: GenerationParams | None = None, request_id: str = "r1") -> list:
    return [c async for c in engine.generate(request_id, [1, 2, 3], params or GenerationParams(max_tokens=8))]


def test_the_request_carries_token_ids_and_the_constraint_and_returns_token_ids():
    fleet = Fleet(a="ok")
    engine = engine_for(fleet, "a")
    chunks = asyncio.run(_collect(engine, GenerationParams(max_tokens=8, temperature=0.0, regex=r"\{.*\}", seed=7, stop=("END",))))
    assert [(c.text, list(c.token_ids), c.finish_reason) for c in chunks] == [("Hello", [11], None), (" world", [12], "stop")]
    _, body = fleet.bodies[0]
    assert body["prompt"] == [1, 2, 3] and body["model"] == "upstream-model" and body["stream"] and body["return_token_ids"]
    assert body["structured_outputs"] == {"regex": r"\{.*\}"} and body["seed"] == 7 and body["stop"] == ["END"]
    assert body["request_id"] == "r1" and body["add_special_tokens"] is False and body["top_k"] == -1


def test_a_refused_upstream_is_retried_elsewhere_and_comes_back_after_a_health_check():
    fleet = Fleet(a="refuse", b="ok")
    engine = engine_for(fleet, "a", "b")

    async def run() -> None:
        chunks = await _collect(engine)
        assert chunks[-1].finish_reason == "stop" and [h for h, _ in fleet.bodies] == ["b"]
        assert [u.healthy for u in engine.upstreams] == [False, True]
        await _collect(engine, request_id="r2")
        assert [h for h, _ in fleet.bodies] == ["b", "b"]  # a stays out while down
        fleet.modes["a"] = "ok"
        await engine.check_health()
        assert all(u.healthy for u in engine.upstreams)
        await engine.shutdown()

    asyncio.run(run())


def test_a_5xx_before_the_first_token_is_retried_and_all_down_is_a_503():
    fleet = Fleet(a="500", b="refuse")
    engine = engine_for(fleet, "a", "b")
    with pytest.raises(ServiceUnavailableError) as err:
        asyncio.run(_collect(engine))
    assert err.value.status_code == 503 and "2 of 2 down" in err.value.message
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(_collect(engine, request_id="r2"))  # both are out until a health check


def test_requests_go_to_the_upstream_with_the_fewest_outstanding():
    fleet = Fleet(a="ok", b="ok")
    engine = engine_for(fleet, "a", "b")

    async def run() -> None:
        first = engine.generate("r1", [1], GenerationParams(max_tokens=8))
        await anext(first)  # r1 is streaming from a
        assert engine.num_unfinished_requests() == 1
        await _collect(engine, request_id="r2")
        assert [h for h, _ in fleet.bodies] == ["a", "b"]
        await first.aclose()
        assert engine.num_unfinished_requests() == 0
        await engine.shutdown()

    asyncio.run(run())


def test_a_client_error_is_not_retried():
    fleet = Fleet(a="400", b="ok")
    engine = engine_for(fleet, "a", "b")
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(_collect(engine))
    assert "maximum context length" in err.value.message and [h for h, _ in fleet.bodies] == ["a"]


def test_a_failure_after_tokens_streamed_is_an_engine_error_not_a_retry():
    fleet = Fleet(a="break", b="ok")
    engine = engine_for(fleet, "a", "b")
    seen = []

    async def run() -> None:
        async for chunk in engine.generate("r1", [1], GenerationParams(max_tokens=8)):
            seen.append(chunk.text)

    with pytest.raises(EngineError):
        asyncio.run(run())
    assert seen == ["Hel"] and [h for h, _ in fleet.bodies] == ["a"]


def test_logprobs_map_to_the_engine_neutral_shape():
    body = _sse(
        {
            "choices": [
                {
                    "index": 0,
                    "text": "Hi",
                    "token_ids": [5],
                    "finish_reason": "length",
                    "logprobs": {"tokens": ["Hi"], "token_logprobs": [-0.5], "top_logprobs": [{"Hi": -0.5, "Yo": -1.5, "Hey": -2.0}]},
                }
            ]
        }
    )
    engine = RemoteEngine(["http://a/v1"], "m", "served", None, 2048, transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body)))
    (chunk,) = asyncio.run(_collect(engine, GenerationParams(max_tokens=1, logprobs=2)))
    (lp,) = chunk.logprobs
    assert (lp.token, lp.logprob, lp.top) == ("Hi", -0.5, (("Hi", -0.5), ("Yo", -1.5)))
