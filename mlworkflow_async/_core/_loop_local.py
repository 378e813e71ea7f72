"""Per-event-loop instances of loop-bound objects (limiters, locks...)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio.lowlevel

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """Lazily make one ``T`` per running event loop.

    Synchronisation primitives must not be shared between event loops; this
    lets a long-lived object (a dataset, a runner) hold one anyway.
    """

    __slots__ = ("_by_loop", "_factory")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        # Keyed by the asyncio loop or the trio run token.
        self._by_loop: weakref.WeakKeyDictionary[Any, T] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        loop = anyio.lowlevel.current_token().native_token
        value = self._by_loop.get(loop)
        if value is None:
            value = self._by_loop[loop] = self._factory()
        return value

    def __getstate__(self) -> dict[str, object]:
        return {"factory": self._factory}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["factory"])  # type: ignore[misc]
