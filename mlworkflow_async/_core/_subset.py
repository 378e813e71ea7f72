"""A dataset restricted to given keys of another."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

from .._combinators._derived import Derived
from ._dataset import Dataset

__all__ = ["Subset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Subset(Derived[K, V]):
    """The items of ``parent`` for the given ``keys`` only, in that order.

    >>> import asyncio
    >>> from mlworkflow_async import DictDataset
    >>> sub = Subset(DictDataset({1: "a", 2: "b", 3: "c"}), [3, 1])
    >>> len(sub), asyncio.run(sub.query([3, 1]), ).tolist()
    (2, ['c', 'a'])
    """

    parent: Dataset[K, V]

    def __init__(self, parent: Dataset[K, V], keys: Iterable[K]) -> None:
        self.parent = parent
        self._subset_keys = tuple(keys)
        self._members = frozenset(self._subset_keys)


    def yield_keys(self) -> tuple[K, ...]:
        return self._subset_keys

    def _check(self, key: K) -> None:
        if key not in self._members:
            raise KeyError(f"{key!r} is not one of the keys of this Subset")

    async def query_item(self, key: K) -> V:
        self._check(key)
        return await self.parent.query_item(key)

    async def query_items(self, keys: Sequence[K]) -> list[V]:
        for key in keys:
            self._check(key)
        return await self.parent.query_items(keys)
