"""A dataset whose items pass through transforms."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from types import CoroutineType
from typing import Any, TypeVar

from .._core._callables import describe, is_async_callable
from .._core._dataset import Dataset
from .._core._engine import add_key_note, map_ordered
from ._derived import SameKeys

__all__ = ["TransformedDataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
F = TypeVar("F", bound=Callable[..., Any])


class TransformedDataset(SameKeys[K, V]):
    """The items of ``parent``, each passed through ``transforms`` in turn.

    Every transform is called as ``transform(key, item)`` and returns the new
    item; it may be a plain function or an ``async def``. Keys are those of
    the parent, so ``len()`` works as soon as the parent's does.

    >>> import asyncio
    >>> from mlworkflow_async import DictDataset
    >>> ds = TransformedDataset(DictDataset({1: "a", 2: "b"}), [lambda k, v: v * k])
    >>> @ds.add_transform
    ... async def shout(key, item):
    ...     return item.upper()
    >>> len(ds), asyncio.run(ds.query_items([1, 2]))
    (2, ['A', 'BB'])

    Items are transformed a batch at a time: each plain transform runs over
    the whole batch in one pass, async ones concurrently. An exception raised
    by a transform propagates as it is, with notes naming the transform and
    the key.
    """

    batched_queries = True

    def __init__(
        self,
        parent: Dataset[K, Any],
        transforms: Iterable[Callable[[K, Any], Any]] = (),
    ) -> None:
        self.parent = parent
        # Whether each transform is async is decided once, here.
        self._steps: list[tuple[Callable[[K, Any], Any], bool]] = []
        self.add_transforms(transforms)

    @property
    def transforms(self) -> tuple[Callable[[K, Any], Any], ...]:
        """The transforms, in the order they are applied."""
        return tuple(step for step, _ in self._steps)

    def add_transform(self, transform: F) -> F:
        """Append ``transform``; returns it, so it can decorate a function."""
        if not callable(transform):
            raise TypeError(f"a transform must be callable, got {type(transform).__name__}")
        self._steps.append((transform, is_async_callable(transform)))
        return transform

    def add_transforms(self, transforms: Iterable[Callable[[K, Any], Any]]) -> None:
        """Append several transforms."""
        for transform in transforms:
            self.add_transform(transform)

    async def query_items(
        self, keys: Sequence[K], concurrency: int | None = None
    ) -> list[V]:
        keys = list(keys)
        items = await self._parent_items(keys, concurrency)
        for transform, is_async in self._steps:
            if is_async:
                items = await self._apply_async(transform, keys, items)
            else:
                items = self._apply(transform, keys, items)
        return items

    def _apply(
        self, transform: Callable[[K, Any], Any], keys: list[K], items: list[Any]
    ) -> list[Any]:
        out: list[Any] = []
        try:
            # One C-level pass over the batch; extend() keeps what came before a failure.
            out.extend(map(transform, keys, items))
        except Exception as exc:
            self._note(exc, transform, keys[len(out)])
            raise
        if CoroutineType in map(type, out):
            self._reject_coroutines(transform, keys, out)
        return out

    async def _apply_async(
        self, transform: Callable[[K, Any], Any], keys: list[K], items: list[Any]
    ) -> list[Any]:
        async def one(index: int) -> Any:
            try:
                return await transform(keys[index], items[index])
            except Exception as exc:
                self._note(exc, transform, keys[index])
                raise

        return await map_ordered(one, range(len(keys)), len(keys), self)

    def _note(self, exc: BaseException, transform: object, key: object) -> None:
        exc.add_note(f"raised by transform {describe(transform)}")
        add_key_note(exc, key, self)

    def _reject_coroutines(self, transform: object, keys: list[K], items: list[Any]) -> None:
        # A plain function returned a coroutine (typically a lambda around an
        # async call); silently making it the item would only fail much later.
        found = [(key, item) for key, item in zip(keys, items, strict=True)
                 if type(item) is CoroutineType]
        for _, coroutine in found:
            coroutine.close()
        raise TypeError(
            f"transform {describe(transform)} returned a coroutine for key {found[0][0]!r}: "
            f"declare it `async def` so that the dataset awaits it"
        )
