"""Bases of the datasets computed from a parent dataset (the combinators)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, TypeVar

from .._core._dataset import Dataset
from .._core._keys import KeySequence
from ..exceptions import ItemCountError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Derived(Dataset[K, V]):
    """A dataset made from ``self.parent``: what it does not change is the parent's.

    A combinator fetches a batch at a time (its ``query_items`` is its one
    path); it reads its parent through the parent's ``query_items``, so the
    parent's own way to fetch is respected.
    """

    parent: Dataset[Any, Any]

    batched_queries = True

    @property
    def context(self) -> Any:
        """The parent's ``context`` (metadata stored along a dataset), or None."""
        return getattr(self.parent, "context", None)

    async def _parent_items(self, keys: list[Any], concurrency: int | None = None) -> list[Any]:
        """The parent's items of ``keys``, fetched the parent's way; one per key, checked."""
        parent = self.parent
        if parent.batched_queries:
            items = list(await parent.query_items(keys))
        else:
            items = await parent.query_items(keys, concurrency)
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
