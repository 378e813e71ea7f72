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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar, cast

from ._keys import KeySequence

__all__ = ["ChunkedKeySequence", "DerivedKeyChunks", "flatten_chunks"]

K = TypeVar("K")
P = TypeVar("P")

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
        pulling = self._pulling = asyncio.Event()
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

    __slots__ = ("_derive", "_largest", "_parent_keys", "_size", "_start")

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

    def __aiter__(self) -> DerivedKeyChunks[K]:
        return self

    async def __anext__(self) -> list[K]:
        while True:
            parent_chunk = await self._parent_keys.chunk_from(
                self._start, self._size, _CHUNK_BUDGET
            )
            if not parent_chunk:
                raise StopAsyncIteration
            derived = await self._derive(parent_chunk)
            # Advance only once the chunk is fully derived: an interrupted
            # chunk is derived again rather than lost.
            self._start += len(parent_chunk)
            self._size = min(2 * self._size, self._largest)
            if derived:
                return derived


async def flatten_chunks(chunks: AsyncIterator[list[K]]) -> AsyncIterator[K]:
    """The keys of successive chunks, one by one."""
    async for chunk in chunks:
        for key in chunk:
            yield key
