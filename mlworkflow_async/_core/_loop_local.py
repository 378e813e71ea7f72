"""Per-event-loop instances of loop-bound objects (limiters, locks...)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """Lazily make one ``T`` per running event loop.

    Synchronisation primitives must not be shared between event loops; this
    lets a long-lived object (a dataset, a runner) hold one anyway.
    """

    __slots__ = ("_by_loop", "_factory")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        value = self._by_loop.get(loop)
        if value is None:
            value = self._by_loop[loop] = self._factory()
        return value

    def __getstate__(self) -> dict[str, object]:
        return {"factory": self._factory}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["factory"])  # type: ignore[misc]
