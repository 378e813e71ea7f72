"""A dataset restricted to given keys of another."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable, Iterable, Sequence, Set
from typing import TypeVar

from .._combinators._derived import Derived
from ..exceptions import UnhashableKeyError
from ._dataset import Dataset

__all__ = ["Subset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Subset(Derived[K, V]):
    """The items of ``parent`` for the given ``keys`` only, in that order.

    >>> import asyncio
    >>> from mlworkflow_async import DictDataset
    >>> sub = Subset(DictDataset({1: "a", 2: "b", 3: "c"}), [3, 1])
    >>> len(sub), asyncio.run(sub.query([3, 1])).tolist()
    (2, ['c', 'a'])

    Reading the subset's keys checks that each is a key of ``parent``; one
    that is not raises ``KeyError`` naming it.
    """

    parent: Dataset[K, V]
    batched_queries = True

    def __init__(self, parent: Dataset[K, V], keys: Iterable[K]) -> None:
        self.parent = parent
        self._subset_keys = tuple(keys)
        try:
            self._members = frozenset(self._subset_keys)
        except TypeError:
            UnhashableKeyError.check(self, self._subset_keys)
            raise

    def yield_keys(self) -> tuple[K, ...] | AsyncIterator[K]:
        parent_keys = self.parent.keys
        if parent_keys.complete:
            self._check_members(parent_keys.known_list())
            return self._subset_keys
        return self._checked_keys()

    async def _checked_keys(self) -> AsyncIterator[K]:
        self._check_members(await self.parent.keys.sequence())
        for key in self._subset_keys:
            yield key

    def _check_members(self, parent_keys: Sequence[K]) -> None:
        known = parent_keys if isinstance(parent_keys, Set) else frozenset(parent_keys)
        for key in self._subset_keys:
            if key not in known:
                raise KeyError(
                    f"{key!r} is one of the keys given to this Subset, but not a key of its "
                    f"parent {type(self.parent).__name__}"
                )

    def _check(self, key: K) -> None:
        if key not in self._members:
            raise KeyError(f"{key!r} is not one of the keys of this Subset")

    def _check_all(self, keys: Sequence[K]) -> None:
        try:
            for key in keys:
                self._check(key)
        except TypeError:
            UnhashableKeyError.check(self, keys)
            raise

    async def query_items(
        self, keys: Sequence[K], concurrency: int | None = None
    ) -> list[V]:
        keys = list(keys)
        self._check_all(keys)
        return await self._parent_items(keys, concurrency)

    def _blocking_items(self, keys: Sequence[K]) -> list[V] | None:
        keys = list(keys)
        self._check_all(keys)
        return self.parent._blocking_items(keys)
