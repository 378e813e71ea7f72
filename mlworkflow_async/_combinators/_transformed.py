"""A dataset whose items pass through transforms."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from types import CoroutineType
from typing import Any, TypeVar

from .._core._amap import map_concurrently, map_each
from .._core._callables import describe, is_async_callable
from .._core._dataset import Dataset
from .._core._engine import add_key_note
from ._derived import SameKeys

__all__ = ["TransformedDataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
F = TypeVar("F", bound=Callable[..., Any])


def _note_transform(exc: BaseException, transform: object, key: object, owner: object) -> None:
    exc.add_note(f"raised by transform {describe(transform)}")
    add_key_note(exc, key, owner)


def _reject_coroutine(transform: object, key: object, item: CoroutineType[Any, Any, Any]) -> None:
    # A plain function returned a coroutine (typically a lambda around an
    # async call); silently making it the item would only fail much later.
    item.close()
    raise TypeError(
        f"transform {describe(transform)} returned a coroutine for key {key!r}: "
        f"declare it `async def` so that the dataset awaits it"
    )


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

    An exception raised by a transform propagates as it is, with notes
    naming the transform and the key.
    """

    def __init__(
        self,
        parent: Dataset[K, Any],
        transforms: Iterable[Callable[[K, Any], Any]] = (),
    ) -> None:
        self.parent = parent
        # Whether each transform is async is decided here, once, so the sync
        # ones are called inline on the hot path.
        self._steps: list[tuple[Callable[[K, Any], Any], bool]] = []
        self._all_sync = True
        self._sync_fns: tuple[Callable[[K, Any], Any], ...] = ()
        self.add_transforms(transforms)

    @property
    def transforms(self) -> tuple[Callable[[K, Any], Any], ...]:
        """The transforms, in the order they are applied."""
        return tuple(step for step, _ in self._steps)

    def add_transform(self, transform: F) -> F:
        """Append ``transform``; returns it, so it can decorate a function."""
        if not callable(transform):
            raise TypeError(f"a transform must be callable, got {type(transform).__name__}")
        is_async = is_async_callable(transform)
        self._steps.append((transform, is_async))
        self._all_sync = self._all_sync and not is_async
        self._sync_fns = tuple(step for step, _ in self._steps) if self._all_sync else ()
        return transform

    def add_transforms(self, transforms: Iterable[Callable[[K, Any], Any]]) -> None:
        """Append several transforms."""
        for transform in transforms:
            self.add_transform(transform)

    # -- keys: those of the parent ---------------------------------------




    # -- items -----------------------------------------------------------

    def _apply_many_sync(self, keys: list[K], items: Sequence[Any]) -> list[Any]:
        # The hot path of sync transforms: each one over the whole batch in a
        # C-level loop, rather than item by item in Python.
        if len(items) != len(keys):
            raise RuntimeError(
                f"{type(self.parent).__name__}.query_items() returned {len(items)} items "
                f"for {len(keys)} keys; it must return one item per key, in order"
            )
        for transform in self._sync_fns:

            def noted(exc: Exception, index: int, transform: Any = transform) -> None:
                _note_transform(exc, transform, keys[index], self)

            items = map_each(transform, keys, items, on_error=noted)
            if CoroutineType in map(type, items):
                self._reject_coroutines(transform, keys, items)
        return items  # type: ignore[return-value]

    def _reject_coroutines(self, transform: Any, keys: list[K], items: list[Any]) -> None:
        coroutines = [
            (key, item) for key, item in zip(keys, items, strict=True)
            if type(item) is CoroutineType
        ]
        for _, coroutine in coroutines[1:]:
            coroutine.close()
        _reject_coroutine(transform, coroutines[0][0], coroutines[0][1])

    async def _apply(self, key: K, item: Any) -> Any:
        for transform, is_async in self._steps:
            try:
                item = transform(key, item)
                if is_async:
                    item = await item
            except Exception as exc:
                _note_transform(exc, transform, key, self)
                raise
            if type(item) is CoroutineType:
                _reject_coroutine(transform, key, item)
        return item

    async def query_item(self, key: K) -> V:
        item = await self.parent.query_item(key)
        if not self._all_sync:
            return await self._apply(key, item)  # type: ignore[no-any-return]
        # Inline loop: the hot path of sync transforms.
        transform: Any = None
        try:
            for transform in self._sync_fns:
                item = transform(key, item)
                if type(item) is CoroutineType:
                    _reject_coroutine(transform, key, item)
        except Exception as exc:
            _note_transform(exc, transform, key, self)
            raise
        return item  # type: ignore[no-any-return]

    async def query_items(self, keys: Sequence[K]) -> list[V]:
        keys = list(keys)
        items = await self.parent.query_items(keys)
        if self._all_sync:
            return self._apply_many_sync(keys, items)
        pairs = list(zip(keys, items, strict=True))
        return await map_concurrently(lambda pair: self._apply(*pair), pairs)
