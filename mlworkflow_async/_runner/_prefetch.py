"""Background consumption of a generator, a bounded number of items ahead.

This is the machinery behind ``SideRunner.yield_async``. One producer task
pulls items from the source and parks them in a small buffer; the consumer
takes them in order. A sync source's ``next()`` runs in a worker thread, so a
heavy batch generator never blocks the event loop.

The producer shares only a small channel object with the iterator handed to
the consumer, never the iterator itself. Dropping the iterator (leaving an
``async for`` with ``break``) therefore frees it at once, and its
``__del__`` stops the producer and closes the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread

from .._core._callables import describe, is_async_callable, positional_arity
from ..exceptions import RunnerClosedError

T = TypeVar("T")

_END = object()


def check_source(source: object) -> None:
    """Refuse, with a hint, what ``yield_async`` cannot consume."""
    if isinstance(source, AsyncIterable | Iterable):
        return
    if callable(source):
        arity = positional_arity(source)
        if arity is None or arity == 0:
            return
        raise TypeError(
            f"yield_async() was given the function {describe(source)}, which needs "
            f"{arity} argument(s). Pass the generator it makes instead, e.g. "
            f"yield_async({describe(source)}(...)), or a function taking no argument."
        )
    raise TypeError(
        f"yield_async() needs a generator, an iterable, an async iterable or a function "
        f"taking no argument that returns one; got {type(source).__name__}"
    )


class _Channel:
    """State shared by the producer task and the consumer."""

    __slots__ = (
        "buffer",
        "error",
        "finished",
        "in_advance",
        "produced",
        "ready",
        "room",
        "scope",
        "stopped",
        "taken",
        "waiting",
    )

    def __init__(self, in_advance: int) -> None:
        self.buffer: deque[Any] = deque()
        self.in_advance = in_advance
        self.produced = 0
        self.taken = 0
        self.waiting = 0  # 1 while the consumer waits for an item
        self.finished = False
        self.error: BaseException | None = None
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.scope: anyio.CancelScope | None = None
        self.stopped = False  # stopped from outside before the source ended

    def may_produce(self) -> bool:
        return self.produced < self.taken + self.waiting + self.in_advance


async def _open(source: Any) -> tuple[Any, bool]:
    """Turn ``source`` into ``(iterator, is_async)``; callables are called first."""
    if not isinstance(source, AsyncIterable | Iterable):
        if (
            is_async_callable(source)
            or inspect.isgeneratorfunction(source)
            or inspect.isasyncgenfunction(source)
        ):
            source = source()  # cheap: nothing runs before the first item
        else:
            # Building the iterable may be heavy work of its own.
            source = await anyio.to_thread.run_sync(source)
        if inspect.isawaitable(source):
            source = await source
    if isinstance(source, AsyncIterable):
        return aiter(source), True
    if isinstance(source, Iterable):
        return iter(source), False
    raise TypeError(
        f"the function given to yield_async() returned {type(source).__name__}, "
        f"which is not iterable"
    )


async def _close(iterator: Any, is_async: bool) -> None:
    if is_async:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
    else:
        close = getattr(iterator, "close", None)
        if close is not None:
            # A generator's ``finally`` may do blocking clean-up.
            await anyio.to_thread.run_sync(close)


async def produce(channel: _Channel, source: Any) -> None:
    """Fill ``channel`` from ``source`` until it ends, fails or is cancelled."""
    limiter = anyio.CapacityLimiter(1)
    iterator: Any = None
    is_async = False
    with anyio.CancelScope() as scope:
        channel.scope = scope
        try:
            iterator, is_async = await _open(source)
            while True:
                while not channel.may_produce():
                    channel.room.clear()
                    await channel.room.wait()
                if is_async:
                    try:
                        item = await anext(iterator)
                    except StopAsyncIteration:
                        break
                else:
                    item = await anyio.to_thread.run_sync(next, iterator, _END, limiter=limiter)
                    if item is _END:
                        break
                channel.buffer.append(item)
                channel.produced += 1
                channel.ready.set()
        except Exception as exc:
            exc.add_note(f"while prefetching from {describe(source)} in SideRunner.yield_async")
            channel.error = exc
        finally:
            channel.finished = True
            channel.ready.set()
            if iterator is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await _close(iterator, is_async)


def _stop(task: asyncio.Task[None], channel: _Channel) -> None:
    if task.done():
        return
    if not channel.finished:
        channel.stopped = True
    if channel.scope is not None:
        channel.scope.cancel()
    else:  # not started yet: the source was never touched
        task.cancel()


class Prefetcher(AsyncIterator[T], Generic[T]):
    """Async iterator over items a background task fetches ahead of time.

    Returned by ``SideRunner.yield_async``. At most ``in_advance`` items are
    fetched and not yet consumed. Errors raised by the source reach the
    consumer in order, after the items produced before them. Leaving the
    ``async for`` early stops the producer and closes the source; so do
    ``await prefetcher.aclose()`` and ``async with``.
    """

    __module__ = "mlworkflow_async"  # public: exported there

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel: _Channel,
        task: asyncio.Task[None],
        name: str,
    ) -> None:
        self._loop = loop
        self._channel = channel
        self._task = task
        self._name = name
        self._done = False

    def __repr__(self) -> str:
        channel = self._channel
        if self._done or (channel.finished and not channel.buffer):
            state = "finished"
        else:
            state = f"{len(channel.buffer)} ready"
        return f"<Prefetcher of {self._name} in_advance={channel.in_advance} {state}>"

    def __aiter__(self) -> Prefetcher[T]:
        return self

    async def __anext__(self) -> T:
        channel = self._channel
        while True:
            if channel.buffer:
                item: T = channel.buffer.popleft()
                channel.taken += 1
                channel.room.set()
                return item
            if self._done:
                raise StopAsyncIteration
            if channel.finished:
                self._done = True
                error, channel.error = channel.error, None
                if error is not None:
                    raise error
                if channel.stopped:
                    raise RunnerClosedError(
                        "this yield_async() iterator was stopped because its SideRunner "
                        "closed; consume it inside the runner's `async with` block"
                    )
                raise StopAsyncIteration
            channel.ready.clear()
            channel.waiting = 1
            channel.room.set()
            try:
                await channel.ready.wait()
            finally:
                channel.waiting = 0

    async def aclose(self) -> None:
        """Stop the producer and close the source, waiting until it is closed."""
        self._done = True
        self._channel.buffer.clear()
        _stop(self._task, self._channel)
        await asyncio.wait([self._task])

    async def __aenter__(self) -> Prefetcher[T]:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._task.done():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with contextlib.suppress(RuntimeError):  # the loop may be closed
            if running is self._loop:
                _stop(self._task, self._channel)
            else:
                self._loop.call_soon_threadsafe(_stop, self._task, self._channel)
