"""Handles for what loads after start-up (the embedding model, the engine).

Services are built once, complete, when the app is created; the models they use load in
the background and arrive later. A service holds a `Late` handle from the start and reads
it when it needs the model, instead of having the model patched onto it afterwards.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Late(Generic[T]):
    def __init__(self, value: T | None = None):
        self.value = value

    def set(self, value: T | None) -> None:
        self.value = value

    @staticmethod
    def of(value: T | Late[T] | None) -> Late[T]:
        """A handle for `value`: itself if it is one, else a handle already holding it."""
        return value if isinstance(value, Late) else Late(value)
