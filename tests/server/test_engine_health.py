"""Orchestration around a failing engine (ScriptedEngine stands in for vLLM; the real
kill and stall are in tests/e2e/test_general.py): the supervisor's states, recovery and
giving up, /ready, and the server-side deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.embedder import Embedder, packaged_model_dir
from server.engine.base import GenerationParams
from server.engine.scripted import ScriptedEngine
from server.engine.supervisor import FAILED, RESTARTING, SERVING, SupervisedEngine
from server.errors import ServiceUnavailableError


class MortalEngine(ScriptedEngine):
    """A ScriptedEngine that can die, as vLLM's does when its processes are killed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dead = False
        self.shut_down = False

    def is_dead(self) -> bool:
        return self.dead

    async def generate(self, request_id, prompt_token_ids, params):
        if self.dead:
            raise ServiceUnavailableError("the engine stopped", code="engine_dead")
        async for chunk in super().generate(request_id, prompt_token_ids, params):
            yield chunk

    async def shutdown(self) -> None:
        self.shut_down = True


async def _drain(engine, text_ids=(1,)):
    return [c async for c in engine.generate("r", list(text_ids), GenerationParams(max_tokens=4))]


def test_a_dead_engine_is_noticed_fails_fast_and_comes_back():
    async def scenario():
        first = MortalEngine(["one two"])
        second = MortalEngine(["three four"])
        loads = [second]
        restarted = []
        sup = SupervisedEngine(first, lambda: loads.pop(0), on_restart=restarted.append, check_interval_s=0.01, backoff_s=(0.05,))
        sup.start()
        assert await _drain(sup)
        first.dead = True
        await asyncio.sleep(0.03)  # the watcher's next look
        assert sup.state == RESTARTING
        with pytest.raises(ServiceUnavailableError) as caught:
            await _drain(sup)
        assert caught.value.code == "engine_restarting" and caught.value.headers["Retry-After"]
        for _ in range(100):
            if sup.state == SERVING:
                break
            await asyncio.sleep(0.01)
        assert sup.state == SERVING and sup.restarts == 1 and restarted == [second]
        assert first.shut_down and sup.inner is second
        assert "".join(c.text for c in await _drain(sup)) == "three four"
        await sup.shutdown()

    asyncio.run(scenario())


def test_a_generation_that_meets_the_dead_engine_starts_recovery_at_once():
    async def scenario():
        first, second = MortalEngine(), MortalEngine(["back"])
        sup = SupervisedEngine(first, lambda: second, check_interval_s=3600, backoff_s=(0.01,))
        first.dead = True
        with pytest.raises(ServiceUnavailableError) as caught:
            await _drain(sup)
        assert caught.value.code == "engine_restarting" and sup.state == RESTARTING
        for _ in range(100):
            if sup.state == SERVING:
                break
            await asyncio.sleep(0.01)
        assert sup.state == SERVING

    asyncio.run(scenario())


def test_repeated_failures_give_up_so_a_supervisor_takes_over():
    async def scenario():
        why: list[str] = []
        first = MortalEngine()

        def load():
            raise RuntimeError("out of memory")

        sup = SupervisedEngine(first, load, give_up=why.append, check_interval_s=0.01, backoff_s=(0.01,), max_failures=3, window_s=60)
        sup.start()
        first.dead = True
        for _ in range(200):
            if sup.state == FAILED:
                break
            await asyncio.sleep(0.01)
        assert sup.state == FAILED and "3 times" in why[0]
        with pytest.raises(ServiceUnavailableError) as caught:
            await _drain(sup)
        assert caught.value.code == "engine_failed"
        await sup.shutdown()

    asyncio.run(scenario())


def test_ready_reports_a_restarting_engine(tmp_path):
    engine = MortalEngine(served_model="scripted", max_model_len=256)
    sup = SupervisedEngine(engine, lambda: MortalEngine(served_model="scripted"), check_interval_s=3600, backoff_s=(3600,))
    embedder = Embedder(packaged_model_dir(), "all-MiniLM-L6-v2")
    with TestClient(create_app(load_settings(data_dir=tmp_path, rails=False), engine=sup, embedder=embedder)) as api:
        assert api.get("/ready").json()["status"] == "ready"
        sup.state = RESTARTING  # as notice_dead leaves it while a new engine loads
        r = api.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "engine_restarting"}
        assert api.get("/health").status_code == 200
        body = api.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
        assert body.status_code == 503 and body.json()["error"]["code"] == "engine_restarting" and body.headers["retry-after"]
        assert "enclave_ready 0.0" in api.get("/metrics").text
        sup.state = SERVING


def test_a_stalled_generation_ends_in_a_504_and_is_aborted(tmp_path):
    engine = ScriptedEngine(["a b c d e f"], served_model="scripted", max_model_len=256, token_delay=2.0)
    settings = load_settings(data_dir=tmp_path, rails=False, stall_timeout_s=0.3)
    with TestClient(create_app(settings, engine=engine)) as api:
        started = time.monotonic()
        r = api.post("/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 504 and r.json()["error"]["code"] == "engine_stalled", r.text
        assert time.monotonic() - started < 2.0
        assert engine.aborted


def test_a_clients_shorter_deadline_is_kept_and_a_longer_one_refused(tmp_path):
    engine = ScriptedEngine(["a b c d e f g h"], served_model="scripted", max_model_len=256, token_delay=0.2)
    settings = load_settings(data_dir=tmp_path, rails=False, request_timeout_s=30)
    with TestClient(create_app(settings, engine=engine)) as api:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
        r = api.post("/v1/chat/completions", json=body, headers={"X-Enclave-Timeout": "0.5"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        for bad in ("31", "0", "-1", "soon"):
            r = api.post("/v1/chat/completions", json=body, headers={"X-Enclave-Timeout": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "X-Enclave-Timeout", bad


def test_a_request_queued_behind_a_busy_engine_waits_and_a_stalled_one_fails():
    from server import deadlines
    from server.deadlines import DeadlineExceededError, watched

    aborted: list[str] = []

    async def abort():
        aborted.append("x")

    async def quiet_then_token(quiet_s: float):
        await asyncio.sleep(quiet_s)
        yield "token"

    async def scenario():
        deadlines.current.set(deadlines.Deadline(time.monotonic() + 30, stall_s=0.4))
        engine_output = {"at": time.monotonic()}

        async def serving_someone_else():
            for _ in range(12):
                await asyncio.sleep(0.1)
                engine_output["at"] = time.monotonic()

        busy = asyncio.create_task(serving_someone_else())
        # Nothing of its own for 1 s, but the engine keeps producing for another request.
        assert [x async for x in watched(quiet_then_token(1.0), abort, lambda: engine_output["at"])] == ["token"]
        await busy
        # Now nothing anywhere: a stall, after 0.4 s, and the generation is aborted.
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as caught:
            [x async for x in watched(quiet_then_token(5.0), abort, lambda: engine_output["at"])]
        assert caught.value.code == "engine_stalled" and time.monotonic() - started < 1.0 and aborted == ["x"]

    asyncio.run(scenario())
