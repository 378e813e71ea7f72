"""Keys derived chunk by chunk from a parent's keys (filtering, augmenting).

Pulling keys one by one through an async source costs a few microseconds
per key in bookkeeping. A derived dataset therefore reads its parent's keys
in chunks, turns each chunk into its own keys with one ``await`` (which may
fetch the parent's items in one ``query_items`` call), and hands the result
to a :class:`ChunkedKeySequence`, which memoizes a whole chunk per pull.

The chunk source is a plain async iterator, not an async generator: the
event loop closes live async generators when it shuts down, which would
silently truncate the keys of a dataset used from successive
``asyncio.run()`` calls.

What deriving a chunk produces besides keys (the items a pair predicate
fetched, an augmented root's children, the keys a predicate accepted) is
kept in a :class:`Discovered` until it is used, so that reading keys then
querying them does the work once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Sequence,
)
from itertools import filterfalse, takewhile
from typing import Any, Generic, TypeVar, cast

from .._core._engine import current_reader
from .._core._keys import KeySequence
from .._core._portal import new_event
from ._memo import MISSING, _Missing

__all__ = ["ChunkedKeySequence", "Discovered", "DerivedKeyChunks", "flatten_chunks"]

K = TypeVar("K")
P = TypeVar("P")
H = TypeVar("H", bound=Hashable)
V = TypeVar("V")

# Waiting this long for a slow parent to fill a chunk keeps the first keys
# flowing quickly while still batching the keys of fast parents.
_CHUNK_BUDGET = 0.005


class ChunkedKeySequence(KeySequence[K]):
    """A :class:`KeySequence` whose source yields lists of keys, not keys.

    Behaves exactly like its base for readers; each pull appends a whole
    chunk, so the per-key cost of an asynchronous source is paid per chunk.
    The source must be resumable after an interrupted step, as
    :class:`DerivedKeyChunks` is: a failure or a cancellation is retried from
    where it happened, without deriving the earlier chunks again.
    """

    __slots__ = ()

    async def _pull(self) -> None:
        self._start()
        if self._done:
            return
        pulling = self._pulling
        if pulling is not None:
            await pulling.wait()
            return
        pulling = self._pulling = new_event()
        try:
            # The base types its source as yielding keys; this one yields chunks.
            source = cast(AsyncIterator[Sequence[K]], self._aiter)
            assert source is not None, "the source of a ChunkedKeySequence must be async"
            while True:
                chunk = await anext(source)
                if chunk:
                    self._cache.extend(chunk)
                    return
        except StopAsyncIteration:
            self._done = True
            self._aiter = None
        finally:
            self._pulling = None
            pulling.set()


class DerivedKeyChunks(AsyncIterator[list[K]]):
    """Chunks of derived keys: ``derive(parent_chunk)`` for successive parent chunks.

    Chunks grow from ``first`` to ``largest`` parent keys so the first keys
    arrive early and later ones in bulk. Chunks that derive no key are
    skipped.
    """

    __slots__ = ("__weakref__", "_derive", "_largest", "_parent_keys", "_size", "_start")

    def __init__(
        self,
        parent_keys: KeySequence[P],
        derive: Callable[[Sequence[P]], Awaitable[list[K]]],
        first: int,
        largest: int,
    ) -> None:
        self._parent_keys = parent_keys
        self._derive = derive
        self._largest = max(1, largest)
        self._size = max(1, min(first, self._largest))
        self._start = 0
        parent_keys.claim(self, self._largest)

    def __aiter__(self) -> DerivedKeyChunks[K]:
        return self

    async def __anext__(self) -> list[K]:
        while True:
            parent_chunk = await self._parent_keys.chunk_from(
                self._start, self._size, _CHUNK_BUDGET
            )
            if not parent_chunk:
                raise StopAsyncIteration
            try:
                derived = await self._derive(parent_chunk)
            except Exception as exc:
                reader = current_reader.get()
                if reader is None or reader.skip is None:
                    raise
                derived = await self._derive_each(parent_chunk, reader.skip, exc)
            # Advance only once the chunk is fully derived: an interrupted
            # chunk is derived again rather than lost.
            self._start += len(parent_chunk)
            self._size = min(2 * self._size, self._largest)
            if derived:
                return derived


    async def _derive_each(
        self,
        parent_chunk: Sequence[Any],
        skip: Callable[[Any, Exception], None],
        error: Exception,
    ) -> list[K]:
        """Derive ``parent_chunk`` key by key, after it failed as a whole for a
        stream that skips failures: the keys that fail alone are left out, and
        recorded by ``skip`` once the chunk is derived.

        Raises ``error`` when every key derives alone: the chunk failed as a
        whole (two roots making one child key), which skipping cannot mend.
        """
        derived: list[K] = []
        failed: list[tuple[Any, Exception]] = []
        for key in parent_chunk:
            try:
                derived.extend(await self._derive([key]))
            except Exception as exc:
                failed.append((key, exc))
        if not failed:
            raise error
        for key, cause in failed:
            skip(key, cause)
        return derived


async def flatten_chunks(chunks: AsyncIterator[list[K]]) -> AsyncIterator[K]:
    """The keys of successive chunks, one by one."""
    async for chunk in chunks:
        for key in chunk:
            yield key


class Discovered(Generic[H, V]):
    """Values by key, made during key discovery and kept for the queries that follow.

    Key discovery runs ahead of the queries by at most what one reader
    claims at once (the keys' ``reach``: a batch, a blocking chunk) plus the
    chunk being derived, so that much is kept, twice over for readers
    claiming concurrently, and never less than ``minimum``. Older values go
    first; a query that misses simply does the work again.

    Each derived chunk is kept as it came, one mapping per chunk, and whole
    chunks are let go: holding and forgetting cost nothing per value.

    >>> held = Discovered[str, int]()
    >>> held.add({"a": 1, "b": 2}, reach=1)
    >>> held.add({"c": 3}, reach=1)
    >>> held.get_all(["c", "a"]), held.get_all(["b", "z"])
    ([3, 1], None)
    >>> held.pop("a"), held.pop("a") is MISSING, held.pop_many(["b", "z"]) == [2, MISSING]
    (1, True, True)
    """

    __slots__ = ("_chunks", "_size", "minimum", "newest")

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum
        self._chunks: deque[dict[H, V]] = deque()
        self._size = 0
        #: The chunk held last, where hot paths look first.
        self.newest: dict[H, V] = {}

    def __len__(self) -> int:
        return self._size

    def add(self, values: dict[H, V], reach: int) -> None:
        """Hold ``values`` (this very dict), forgetting the oldest chunks beyond the bound.

        ``reach`` is that of the keys being derived.
        """
        if not values:
            return
        chunks = self._chunks
        chunks.append(values)
        self.newest = values
        self._size += len(values)
        # With no live reader nothing is about to be queried: hold nothing.
        keep = max(self.minimum, 2 * reach + len(values)) if reach else self.minimum
        if not keep:
            self.clear()
            return
        while len(chunks) > 1 and self._size - len(chunks[0]) >= keep:
            self._size -= len(chunks.popleft())

    def get(self, key: H) -> V | _Missing:
        """The value of ``key``, or ``MISSING``."""
        for values in reversed(self._chunks):
            value = values.get(key, MISSING)
            if value is not MISSING:
                return value
        return MISSING

    def __contains__(self, key: object) -> bool:
        return any(key in values for values in self._chunks)

    def contains_all(self, keys: Iterable[H]) -> bool:
        """Whether every one of ``keys`` is held (C-level passes, one per chunk)."""
        if all(map(self.newest.__contains__, keys)):
            return True
        for values in reversed(self._chunks):
            keys = list(filterfalse(values.__contains__, keys))
            if not keys:
                return True
        return False

    def get_all(self, keys: Sequence[H]) -> list[V] | None:
        """The values of ``keys``, still held, if every one is held; else None."""
        newest = self.newest
        if all(map(newest.__contains__, keys)):
            return list(map(newest.__getitem__, keys))
        # Keys claimed in discovery order run through consecutive chunks:
        # take from each chunk the run of keys it holds, in C-level passes.
        values: list[V] = []
        rest = list(keys)
        for chunk in self._chunks:
            run = list(takewhile(chunk.__contains__, rest))
            if run:
                values.extend(map(chunk.__getitem__, run))
                del rest[: len(run)]
                if not rest:
                    return values
        if not self.contains_all(keys):
            return None
        get = self.get
        return [get(key) for key in keys]  # type: ignore[misc]

    def pop(self, key: H) -> V | _Missing:
        """The value of ``key``, no longer held, or ``MISSING``."""
        for values in reversed(self._chunks):
            value = values.pop(key, MISSING)
            if value is not MISSING:
                self._size -= 1
                return value
        return MISSING

    def pop_many(self, keys: Sequence[H]) -> list[V | _Missing]:
        """:meth:`pop` for each of ``keys``."""
        pop = self.pop
        return [pop(key) for key in keys]

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0
        self.newest = {}

    def __getstate__(self) -> dict[str, Any]:
        # Held values are only a shortcut for queries in this process.
        return {"minimum": self.minimum}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["minimum"])  # type: ignore[misc]
