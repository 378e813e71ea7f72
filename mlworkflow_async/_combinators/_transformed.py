"""A dataset whose items pass through transforms."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Iterable, Sequence
from types import CoroutineType
from typing import Any, TypeVar

from .._core._callables import describe, is_async_callable
from .._core._dataset import Dataset
from .._core._engine import add_key_note, map_ordered
from .._core._executors import worker_pool
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

    ``executor`` runs the transforms elsewhere, a batch per hop: ``"thread"``
    (a pool of ``workers`` threads, for work that releases the GIL; async
    transforms stay on the loop), ``"process"`` (a pool of ``workers``
    processes, for pure-Python work; lambdas, closures and async transforms
    run there too), any ``concurrent.futures.Executor`` or a
    ``dask.distributed.Client``. ``aclose()`` or ``async with`` closes a
    pool made here.
    """

    batched_queries = True

    def __init__(
        self,
        parent: Dataset[K, Any],
        transforms: Iterable[Callable[[K, Any], Any]] = (),
        executor: Any = None,
        workers: int | None = None,
    ) -> None:
        self.parent = parent
        self._pool = worker_pool(executor, workers)
        # What the workers are handed, made once (a callable is pickled once per pool).
        self._chains: list[tuple[list[Any], Callable[..., Any], bool]] | None = None
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
        self._chains = None
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
        if self._pool is not None:
            return await self._in_pool(keys, items)
        for transform, is_async in self._steps:
            if is_async:
                items = await self._apply_async(transform, keys, items)
            else:
                items = self._apply(transform, keys, items)
        return items

    def _blocking_items(self, keys: Sequence[K]) -> list[V] | None:
        # Plain transforms over a parent read on the calling thread run there too,
        # as the original library ran them (a map-style __getitem__ over a file).
        if self._pool is not None or any(is_async for _, is_async in self._steps):
            return None
        items = self.parent._blocking_items(keys)
        if items is None:
            return None
        keys = list(keys)
        for transform, _ in self._steps:
            items = self._apply(transform, keys, items)
        return items

    async def _in_pool(self, keys: list[K], items: list[Any]) -> list[Any]:
        """The transforms over a batch, by the workers: consecutive steps in one hop."""
        pool = self._pool
        assert pool is not None
        if self._chains is None:
            self._chains = [
                (steps, _AsyncChain(steps) if is_async else _Chain(steps), is_async)
                for steps, is_async in self._hops(pool.in_threads)
            ]
        for steps, chain, is_async in self._chains:
            if is_async and pool.in_threads:
                for transform in steps:
                    items = await self._apply_async(transform, keys, items)
                continue

            def noted(exc: BaseException, index: int) -> None:
                add_key_note(exc, keys[index], self)

            items = await pool.run_batch(
                chain, list(zip(keys, items, strict=True)), keys=keys, on_error=noted
            )
        return items

    def _hops(self, in_threads: bool) -> list[tuple[list[Callable[[K, Any], Any]], bool]]:
        """The steps, grouped: threads take runs of plain steps; processes take all at once."""
        if not in_threads:
            return [([t for t, _ in self._steps], any(a for _, a in self._steps))]
        hops: list[tuple[list[Callable[[K, Any], Any]], bool]] = []
        for transform, is_async in self._steps:
            if hops and hops[-1][1] == is_async:
                hops[-1][0].append(transform)
            else:
                hops.append(([transform], is_async))
        return hops

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


class _Steps:
    """Transforms applied in turn to one ``(key, item)``, wherever a worker calls them."""

    def __init__(self, steps: list[Callable[[Any, Any], Any]]) -> None:
        self.steps = steps
        # For messages: the transforms that a dead worker was running.
        self.__qualname__ = "transform" + ("s " if len(steps) > 1 else " ") + ", ".join(
            map(describe, steps)
        )


class _Chain(_Steps):
    def __call__(self, key: Any, item: Any) -> Any:
        transform: Any = None
        try:
            for transform in self.steps:
                item = transform(key, item)
                if type(item) is CoroutineType:
                    _reject_coroutine(transform, key, item)
        except Exception as exc:
            exc.add_note(f"raised by transform {describe(transform)}")
            raise
        return item


class _AsyncChain(_Steps):
    async def __call__(self, key: Any, item: Any) -> Any:
        transform: Any = None
        try:
            for transform in self.steps:
                item = transform(key, item)
                if inspect.isawaitable(item):
                    item = await item
        except Exception as exc:
            exc.add_note(f"raised by transform {describe(transform)}")
            raise
        return item


def _reject_coroutine(transform: object, key: object, item: CoroutineType[Any, Any, Any]) -> None:
    item.close()
    raise TypeError(
        f"transform {describe(transform)} returned a coroutine for key {key!r}: "
        f"declare it `async def` so that the dataset awaits it"
    )
