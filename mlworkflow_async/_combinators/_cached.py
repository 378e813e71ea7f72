"""A dataset that keeps the items of another in memory."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import TypeVar

import anyio

from .._core._dataset import Dataset
from ._derived import SameKeys
from ._memo import MISSING, Memo

__all__ = ["CachedDataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Keys handed to the parent's query_items() at once by fill().
_FILL_CHUNK = 64


class CachedDataset(SameKeys[K, V]):
    """The items of ``parent``, each fetched once and then kept in memory.

    Tasks asking for an item that is being fetched wait for that fetch
    instead of starting another. The cache is a plain in-memory mapping,
    unbounded by default; with ``maxsize`` it keeps the most recently used
    items only. A failed fetch is not cached.

    >>> import asyncio
    >>> from mlworkflow_async import DictDataset
    >>> async def main():
    ...     ds = await CachedDataset(DictDataset({"a": 1, "b": 2}), maxsize=10).fill()
    ...     return dict(ds.cache), await ds.query_item("b")
    >>> asyncio.run(main())
    ({'a': 1, 'b': 2}, 2)
    """

    def __init__(self, parent: Dataset[K, V], maxsize: int | None = None) -> None:
        self.parent = parent
        self._memo: Memo[K, V] = Memo(maxsize)

    @property
    def maxsize(self) -> int | None:
        """The most items kept, or None for no bound."""
        return self._memo.maxsize

    @property
    def cache(self) -> Mapping[K, V]:
        """A read-only view of the items held now."""
        return MappingProxyType(self._memo.data)

    def clear(self) -> None:
        """Forget every cached item."""
        self._memo.clear()

    # -- keys: those of the parent ---------------------------------------




    # -- items -----------------------------------------------------------

    async def query_item(self, key: K) -> V:
        item = self._memo.lookup(key)
        if item is not MISSING:
            return item
        return await self._memo.load(key, self.parent.query_item)

    async def query_items(self, keys: Sequence[K]) -> list[V]:
        return await self._memo.load_many(list(keys), self.parent.query_items)

    async def fill(self, concurrency: int = 64) -> CachedDataset[K, V]:
        """Load every item (at most ``concurrency`` fetches at once); returns ``self``.

        With ``maxsize``, stops once the cache is full.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        chunk = min(_FILL_CHUNK, concurrency)
        slots = anyio.Semaphore(max(1, concurrency // chunk))
        keys = self.keys
        memo = self._memo
        maxsize = memo.maxsize

        async def load(batch: Sequence[K]) -> None:
            try:
                await self.query_items(batch)
            finally:
                slots.release()

        try:
            async with anyio.create_task_group() as tg:
                start = 0
                while maxsize is None or len(memo.data) < maxsize:
                    batch = await keys.chunk_from(start, chunk)
                    if not batch:
                        break
                    start += len(batch)
                    await slots.acquire()
                    tg.start_soon(load, batch)
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
        return self
