"""SupervisedEngine: an in-process engine that is watched and brought back when it dies.

vLLM runs its engine core (and, by configuration, workers) in child processes. When the
kernel's OOM killer or an operator takes one of them, vLLM marks the engine dead and
every generation fails from then on. Left alone the server would stay up and useless, and
a load balancer would keep sending it traffic. So:

* a watcher checks the engine once a second; a dead engine is also noticed at once by the
  first generation that fails with `engine_dead`;
* while the engine is down, `/ready` answers 503 and generations fail fast with an
  OpenAI-shaped 503 `engine_restarting` (with Retry-After), in flight and new alike;
* the engine is loaded again, with backoff between failed attempts; the tokenizer and
  everything above the engine stay, so serving resumes without an operator;
* after `max_failures` deaths or failed loads within `window_s`, the supervisor gives up
  and calls `give_up` (the server exits non-zero, so its supervisor, systemd or
  Kubernetes, takes over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from server.engine.base import Engine, EngineWrapper, GenerationChunk, GenerationParams
from server.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

SERVING, RESTARTING, FAILED = "serving", "restarting", "failed"


class SupervisedEngine(EngineWrapper):
    state = SERVING  # a plain attribute here (the base class's is a read-only property)

    def __init__(
        self,
        engine: Engine,
        reload: Callable[[], Engine],
        *,
        give_up: Callable[[str], None] = lambda why: None,
        on_restart: Callable[[Engine], None] = lambda engine: None,
        check_interval_s: float = 1.0,
        backoff_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0),
        max_failures: int = 5,
        window_s: float = 900.0,
    ):
        self._engine = engine
        self._reload = reload
        self._give_up = give_up
        self._on_restart = on_restart
        self.check_interval_s = check_interval_s
        self.backoff_s = backoff_s
        self.max_failures = max_failures
        self.window_s = window_s
        self.state = SERVING
        self.restarts = 0
        self._failures: deque[float] = deque()
        self._watcher: asyncio.Task | None = None
        self._recovery: asyncio.Task | None = None

    # ------------------------------------------------------------ the Engine interface

    @property
    def inner(self) -> Engine:
        return self._engine  # the current one: a restart replaces it

    @property
    def serving(self) -> bool:
        return self.state == SERVING

    def _unavailable(self) -> ServiceUnavailableError:
        if self.state == FAILED:
            error = ServiceUnavailableError("the engine failed repeatedly and the server is shutting down", code="engine_failed")
        else:
            error = ServiceUnavailableError("the engine stopped and is restarting; retry shortly", code="engine_restarting", headers={"Retry-After": "10"})
        return error

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        if not self.serving:
            raise self._unavailable()
        engine = self._engine
        try:
            async for chunk in engine.generate(request_id, prompt_token_ids, params):
                yield chunk
        except ServiceUnavailableError as exc:
            if exc.code == "engine_dead":
                self.notice_dead(engine)
                raise self._unavailable() from None
            raise

    async def abort(self, request_id: str) -> None:
        if self.serving:
            await self._engine.abort(request_id)

    def num_unfinished_requests(self) -> int:
        return self._engine.num_unfinished_requests() if self.serving else 0

    def scheduler_counts(self) -> tuple[int, int] | None:
        return self._engine.scheduler_counts() if self.serving else (0, 0)

    def is_dead(self) -> bool:
        return False  # a dead inner engine is replaced, not reported

    async def shutdown(self) -> None:
        for task in (self._watcher, self._recovery):
            if task is not None:
                task.cancel()
        await self._engine.shutdown()

    # ------------------------------------------------------------ watching and recovery

    def start(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            if self.serving and self._engine.is_dead():
                self.notice_dead(self._engine)

    def notice_dead(self, engine: Engine) -> None:
        """`engine` was found dead: start recovering, once, unless it was replaced already."""
        if engine is not self._engine or not self.serving:
            return
        log.error("the engine serving %s died; restarting it", self.served_model)
        self.state = RESTARTING
        self._recovery = asyncio.get_running_loop().create_task(self._recover(engine))

    def _failed_too_often(self) -> bool:
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window_s:
            self._failures.popleft()
        return len(self._failures) >= self.max_failures

    async def _recover(self, dead: Engine) -> None:
        try:
            await dead.shutdown()  # frees what is left of it: processes, sockets, memory
        except Exception:  # noqa: BLE001 - a dead engine may fail to stop in many ways
            log.warning("stopping the dead engine failed", exc_info=True)
        attempt = 0
        while True:
            if self._failed_too_often():
                self.state = FAILED
                why = f"the engine serving {self.served_model} died or failed to load {len(self._failures)} times in {self.window_s:g} s"
                log.error("%s; giving up", why)
                self._give_up(why)
                return
            delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
            await asyncio.sleep(delay)
            try:
                engine = await asyncio.to_thread(self._reload)
            except Exception:  # noqa: BLE001 - any failure to load is retried, then given up on
                log.exception("loading the engine again failed (attempt %d)", attempt + 1)
                attempt += 1
                continue
            self._engine = engine
            self.restarts += 1
            self.state = SERVING
            self._on_restart(engine)
            log.info("the engine serving %s is back (restart %d)", self.served_model, self.restarts)
            return
