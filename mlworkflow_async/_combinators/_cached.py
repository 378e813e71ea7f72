"""A dataset that keeps the items of another in memory."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import TypeVar

from .._core._dataset import Dataset
from ..exceptions import UnhashableKeyError
from ._derived import SameKeys
from ._memo import Memo

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

    batched_queries = True

    def __init__(self, parent: Dataset[K, V], maxsize: int | None = None) -> None:
        if maxsize is not None and (isinstance(maxsize, bool) or not isinstance(maxsize, int)):
            raise TypeError(
                f"maxsize must be None (no bound) or an integer of at least 1, got {maxsize!r}"
            )
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

    async def query_items(
        self, keys: Sequence[K], concurrency: int | None = None
    ) -> list[V]:
        keys = list(keys)
        try:
            return await self._memo.load_many(
                keys, lambda missing: self._parent_items(missing, concurrency)
            )
        except TypeError:
            UnhashableKeyError.check(self, keys)
            raise

    async def fill(self, concurrency: int = 64) -> CachedDataset[K, V]:
        """Load every item (at most ``concurrency`` fetches at once); returns ``self``.

        With ``maxsize``, stops once the cache is full.
        """
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise TypeError(f"concurrency must be an integer of at least 1, got {concurrency!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        memo = self._memo
        maxsize = memo.maxsize
        engine = self._engine(self.keys, min(_FILL_CHUNK, concurrency), concurrency)
        try:
            while maxsize is None or len(memo.data) < maxsize:
                try:
                    await engine.next_unit()
                except StopAsyncIteration:
                    break
        finally:
            await engine.aclose()
        return self
