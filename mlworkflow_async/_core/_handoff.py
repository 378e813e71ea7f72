"""Handing the items of an async iterator to a blocking thread, a few ahead.

A blocking call costs two thread wake-ups (about 0.1 ms here, benchmark
W10), more than a batch of small items takes to make. So the blocking view
of a stream does not make one call a batch: a task on the background loop
takes the items as they come and parks up to ``ahead`` of them, and the
blocking consumer takes them in order, waiting (one wake-up) only when none
is parked. Each item travels with a snapshot taken on the loop as it was
taken, so that the consumer knows where the iterator was as of the items it
actually received.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from ._portal import call

__all__ = ["Handoff"]

T = TypeVar("T")


class Handoff(Generic[T]):
    """Items of ``source`` for a blocking consumer, up to ``ahead`` taken in advance.

    Nothing runs before the first :meth:`take`. ``snapshot()`` is called on
    the loop after each item is taken. Once ``ahead`` are parked, the taking
    task waits until half of them are taken: one wake-up of the loop per
    ``ahead // 2`` items.

    >>> async def numbers():
    ...     for n in range(3):
    ...         yield n
    >>> handoff = Handoff(numbers(), ahead=2, snapshot=lambda: "seen")
    >>> [handoff.take() for _ in range(3)]
    [(0, 'seen'), (1, 'seen'), (2, 'seen')]
    >>> handoff.take()
    Traceback (most recent call last):
    ...
    StopAsyncIteration
    >>> call(handoff.aclose)
    """

    def __init__(
        self, source: AsyncIterator[T], ahead: int, snapshot: Callable[[], Any]
    ) -> None:
        self._source = source
        self._snapshot = snapshot
        self._ready = threading.Condition()
        self._parked: deque[tuple[T, Any]] = deque()
        # Set once the source ends: StopAsyncIteration, or what it raised.
        self._end: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pid = os.getpid()
        self._ahead = self._low = 1
        self.set_ahead(ahead)

    def take(self) -> tuple[T, Any]:
        """The next item and its snapshot; blocks until there is one.

        Raises ``StopAsyncIteration`` at the end, or what the source raised.
        """
        if self._task is None:
            call(self._start)
        elif self.in_forked_child():
            raise RuntimeError(
                "this blocking stream was started in the parent of this forked process, "
                "whose event loop thread does not exist here: start a new one in the child "
                "(ds.sync.batches(...) there)"
            )
        with self._ready:
            while not self._parked:
                if self._end is not None:
                    raise self._end
                self._ready.wait()
            item = self._parked.popleft()
            refill = len(self._parked) == self._low
        if refill:
            loop, room = self._loop, self._room
            assert loop is not None
            assert room is not None
            loop.call_soon_threadsafe(room.set)
        return item

    def set_ahead(self, ahead: int) -> None:
        """Take up to ``ahead`` items in advance from now on (at least 1)."""
        ahead = max(1, ahead)
        with self._ready:
            grew = ahead > self._ahead
            self._ahead, self._low = ahead, ahead // 2
        loop, room = self._loop, self._room
        if grew and loop is not None and room is not None:
            loop.call_soon_threadsafe(room.set)

    def in_forked_child(self) -> bool:
        """True in a process forked after this hand-off started taking items."""
        return self._task is not None and self._pid != os.getpid()

    async def _start(self) -> None:
        self._pid = os.getpid()
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        self._task = asyncio.ensure_future(self._take_ahead())

    async def _take_ahead(self) -> None:
        room = self._room
        assert room is not None
        parked, ready = self._parked, self._ready
        try:
            while True:
                while len(parked) >= self._ahead:
                    room.clear()
                    if len(parked) <= self._low:  # taken meanwhile: its set() comes late
                        break
                    await room.wait()
                item = await anext(self._source)
                snapshot = self._snapshot()
                with ready:
                    parked.append((item, snapshot))
                    ready.notify()
        except BaseException as exc:
            with ready:
                self._end = exc
                ready.notify()
            if not isinstance(exc, Exception | StopAsyncIteration):
                raise  # cancellation: the task ends as cancelled

    async def aclose(self) -> None:
        """Stop taking items (on the loop); the source itself is left to its owner."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        with self._ready:
            if self._end is None:
                self._end = StopAsyncIteration()
            self._parked.clear()
