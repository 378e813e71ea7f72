"""Bases of the datasets computed from a parent dataset (the combinators)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, TypeVar

from .._core._dataset import Dataset
from .._core._keys import KeySequence

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Derived(Dataset[K, V]):
    """A dataset made from ``self.parent``: what it does not change is the parent's."""

    parent: Dataset[Any, Any]

    @property
    def batched_queries(self) -> bool:  # type: ignore[override]
        return self.parent.batched_queries

    @property
    def context(self) -> Any:
        """The parent's ``context`` (metadata stored along a dataset), or None."""
        return getattr(self.parent, "context", None)


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
