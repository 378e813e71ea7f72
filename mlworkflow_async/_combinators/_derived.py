"""Bases of the datasets computed from a parent dataset (the combinators)."""

from __future__ import annotations

from collections.abc import Hashable
from types import TracebackType
from typing import Any, TypeVar

from .._core._dataset import Dataset, bounded_items
from .._core._executors import WorkerPool
from .._core._keys import KeySequence
from ..exceptions import ItemCountError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D", bound="Derived[Any, Any]")


class Derived(Dataset[K, V]):
    """A dataset made from ``self.parent``: what it does not change is the parent's.

    A combinator fetches a batch at a time (its ``query_items`` is its one
    path); it reads its parent through the parent's ``query_items``, so the
    parent's own way to fetch is respected.
    """

    parent: Dataset[Any, Any]

    batched_queries = True

    #: Where the combinator's callables run, from its ``executor=`` (None: on the loop).
    _pool: WorkerPool | None = None

    async def aclose(self) -> None:
        """Close the worker pools of this dataset and of the combinators it is made from.

        A pool closed starts again if the dataset is used later. Executors
        that were passed in are left to their owner.
        """
        dataset: Dataset[Any, Any] | None = self
        while isinstance(dataset, Derived):
            if dataset._pool is not None:
                await dataset._pool.aclose()
            dataset = dataset.parent

    def _batches_ahead(self) -> int:
        # A stage in a pool keeps each worker busy at the seams between
        # batches with a batch queued per worker (benchmark CPU a: 1.09x
        # with 4 batches in flight for 2 processes, against 2).
        ahead = self.parent._batches_ahead()
        if self._pool is not None:
            ahead = max(ahead, self._pool.workers + 2)
        return ahead

    async def __aenter__(self: D) -> D:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def context(self) -> Any:
        """The parent's ``context`` (metadata stored along a dataset), or None."""
        return getattr(self.parent, "context", None)

    async def _parent_items(self, keys: list[Any], concurrency: int | None = None) -> list[Any]:
        """The parent's items of ``keys``, fetched the parent's way; one per key, checked."""
        parent = self.parent
        items = await bounded_items(parent, keys, concurrency)
        if type(items) is not list:
            items = list(items)
        ItemCountError.check(parent, items, keys)
        return items


class SameKeys(Derived[K, V]):
    """A derived dataset whose keys are exactly its parent's.

    It shares the parent's memoized key sequence, so its keys and ``len()``
    are known exactly when the parent's are.
    """

    parent: Dataset[K, Any]

    @property
    def keys(self) -> KeySequence[K]:
        return self.parent.keys

    def yield_keys(self) -> KeySequence[K]:
        return self.parent.keys

    def __len__(self) -> int:
        return len(self.parent)
