"""The keys of a format 2 file, unpickled in worker threads when first awaited.

A format 2 file stores its keys pickled (see :mod:`._format2`) and unpickles
them only when asked: 500k string keys take about half a second, which
would stall the event loop if done there. :class:`FileKeys` is the
``dataset.keys`` of such a file: its length is known at open, and the keys
are unpickled chunk by chunk, each chunk in a worker thread, the first time
an awaiting reader needs them (``batches()``, ``await keys.all()``, ``async
for``). A blocking look at them before that (``keys.known``, say) unpickles
them on the calling thread, as a plain list would have been built.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, cast, overload

import anyio.to_thread

from .._core._keys import KeySequence
from ._index2 import Index2

__all__ = ["FileKeys", "LazyKeys"]

#: Keys unpickled per worker thread call (about 40 ms of work for short strings).
CHUNK = 32768


class LazyKeys(Sequence[Any]):
    """The keys of an index, unpickled on first use, in chunks; then a plain list.

    Safe to load from several threads and tasks at once: they share the
    chunks, each unpickled once.
    """

    def __init__(self, index: Index2) -> None:
        self._index = index
        self._lock = threading.Lock()
        self._chunks: Iterator[list[Any]] | None = None
        self._partial: list[Any] = []
        self._keys: list[Any] | None = None

    def _step(self) -> list[Any] | None:
        """Unpickle the next chunk; return every key once the last is done."""
        with self._lock:
            if self._keys is None:
                if self._chunks is None:
                    self._chunks = self._index.key_chunks(CHUNK)
                try:
                    chunk = next(self._chunks, None)
                except BaseException:
                    # A damaged file: start afresh next time (and fail the same way).
                    self._chunks, self._partial = None, []
                    raise
                if chunk is None:
                    self._keys, self._partial, self._chunks = self._partial, [], None
                else:
                    self._partial += chunk
            return self._keys

    async def load(self) -> list[Any]:
        """Every key, unpickled in worker threads, a chunk per call."""
        keys = self._keys
        while keys is None:
            keys = await anyio.to_thread.run_sync(self._step)
        return keys

    def materialize(self) -> list[Any]:
        """Every key, unpickled on the calling thread if not done yet."""
        keys = self._keys
        while keys is None:
            keys = self._step()
        return keys

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        return self.materialize()[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.materialize())

    def __reduce__(self) -> tuple[Any, ...]:
        return list, (self.materialize(),)


class FileKeys(KeySequence[Any]):
    """The key sequence of a format 2 file: complete from the start, unpickled when awaited.

    Built like any :class:`KeySequence` when ``index`` is None (as when
    unpickled in another process, with its keys).
    """

    __slots__ = ()

    def __init__(
        self, factory: Callable[[], Any], owner: str, index: Index2 | None = None
    ) -> None:
        super().__init__(factory, owner)
        if index is not None:
            self._cache = cast("list[Any]", LazyKeys(index))
            self._done = True

    async def _ready(self) -> None:
        cache: Sequence[Any] = self._cache
        if isinstance(cache, LazyKeys):
            self._cache = await cache.load()

    async def sequence(self) -> Sequence[Any]:
        await self._ready()
        return await super().sequence()

    async def slice(self, start: int, stop: int) -> list[Any]:
        await self._ready()
        return await super().slice(start, stop)

    async def chunk_from(self, start: int, size: int, budget: float = 0.02) -> tuple[Any, ...]:
        await self._ready()
        return await super().chunk_from(start, size, budget)

    async def _iterate(self) -> AsyncIterator[Any]:
        await self._ready()
        async for key in super()._iterate():
            yield key
