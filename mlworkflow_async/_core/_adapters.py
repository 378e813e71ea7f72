"""Using blocking datasets, such as the original ``mlworkflow`` ones, from async code."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Hashable, Iterator
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from ._dataset import Dataset
from ._loop_local import LoopLocal

__all__ = ["SyncDatasetLike", "from_sync", "FromSync"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Keys of a blocking source are pulled in chunks so that each thread hop
# (~100 us) brings many keys, but no longer than this before handing them on.
_KEY_CHUNK = 1024
_KEY_CHUNK_SECONDS = 0.02


class SyncDatasetLike(Protocol):
    """Anything with blocking ``yield_keys()`` and ``query_item(key)``."""

    def yield_keys(self) -> Any: ...

    def query_item(self, key: Any) -> Any: ...


def _take(iterator: Iterator[Any]) -> tuple[list[Any], bool]:
    chunk: list[Any] = []
    deadline = time.monotonic() + _KEY_CHUNK_SECONDS
    for key in iterator:
        chunk.append(key)
        if len(chunk) >= _KEY_CHUNK or time.monotonic() > deadline:
            return chunk, False
    return chunk, True


class FromSync(Dataset[K, V]):
    """An async dataset over a blocking one; made by :func:`from_sync`."""

    def __init__(
        self, wrapped: SyncDatasetLike, limiter: anyio.CapacityLimiter | int | None
    ) -> None:
        self.wrapped = wrapped
        if isinstance(limiter, int):
            total = limiter
            self._limiter: LoopLocal[anyio.CapacityLimiter] | anyio.CapacityLimiter | None = (
                LoopLocal(lambda: anyio.CapacityLimiter(total))
            )
        else:
            self._limiter = limiter

    def _get_limiter(self) -> anyio.CapacityLimiter | None:
        limiter = self._limiter
        return limiter.get() if isinstance(limiter, LoopLocal) else limiter

    @property
    def context(self) -> Any:
        return getattr(self.wrapped, "context", None)

    def yield_keys(self) -> AsyncIterator[K]:
        return self._keys_from_threads()

    async def _keys_from_threads(self) -> AsyncIterator[K]:
        limiter = self._get_limiter()
        make = self.wrapped.yield_keys
        if inspect.isgeneratorfunction(make):
            source = make()  # creating a generator runs none of its code
        else:
            source = await anyio.to_thread.run_sync(make, limiter=limiter)
        iterator = iter(source)
        done = False
        while not done:
            chunk, done = await anyio.to_thread.run_sync(_take, iterator, limiter=limiter)
            for key in chunk:
                yield key

    async def query_item(self, key: K) -> V:
        result: V = await anyio.to_thread.run_sync(
            self.wrapped.query_item, key, limiter=self._get_limiter()
        )
        return result

    def __repr__(self) -> str:
        return f"from_sync({self.wrapped!r})"


def from_sync(
    dataset: SyncDatasetLike, limiter: anyio.CapacityLimiter | int | None = None
) -> FromSync[Any, Any]:
    """Wrap a blocking dataset so it can be used as an async one.

    ``dataset`` is any object with blocking ``yield_keys()`` and
    ``query_item(key)``, such as an original ``mlworkflow`` dataset. Its
    calls run in worker threads; ``limiter`` (a ``CapacityLimiter`` or a
    number of threads) bounds how many at once, defaulting to anyio's
    shared thread limiter.

    >>> import asyncio
    >>> class Legacy:
    ...     def yield_keys(self):
    ...         yield from "ab"
    ...     def query_item(self, key):
    ...         return key.upper()
    >>> ds = from_sync(Legacy(), limiter=4)
    >>> asyncio.run(ds.keys.all()), ds.sync.query_item("b")
    (['a', 'b'], 'B')
    """
    return FromSync(dataset, limiter)
