"""Recent results of an async computation, by key: a result asked for again is served
from the most recent ones, and callers asking while it is under way share that one
computation (the stages of a turn that start together ask for the same things: the
embedding of its message, its harmful-intent score)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    def __init__(self, size: int):
        self.size = size
        self.done: OrderedDict[K, V] = OrderedDict()
        self.pending: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        if key in self.done:
            self.done.move_to_end(key)
            return self.done[key]
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = asyncio.ensure_future(self._keep(key, compute))
        # Shielded: one caller giving up (a client that left) must not cancel the others'.
        return await asyncio.shield(pending)

    async def _keep(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        try:
            value = await compute()
        finally:
            self.pending.pop(key, None)
        self.done[key] = value
        if len(self.done) > self.size:
            self.done.popitem(last=False)
        return value
