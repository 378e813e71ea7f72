"""The abstract :class:`Dataset`: keys, items, queries and batches.

A dataset is a set of ``(key, item)`` pairs. Keys are light, hashable and
immutable (a ``NamedTuple`` is typical); items hold the heavy data. A
subclass says which keys exist and how to fetch one item::

    class Squares(Dataset[int, int]):
        def yield_keys(self):
            return range(10)

        async def query_item(self, key):
            return key * key

Everything else (memoized keys, concurrent batches, collation, the blocking
``sync`` view) comes from the base class.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import numpy as np

from ._collate import batchify
from ._engine import BatchStream, add_key_note
from ._keys import KeySequence

if TYPE_CHECKING:
    from ..sync import SyncView

__all__ = ["Dataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Dataset(ABC, Generic[K, V]):
    """Abstract base of every dataset.

    Subclasses implement :meth:`yield_keys` and ``async def``
    :meth:`query_item`. Keys are discovered lazily and memoized in
    :attr:`keys`; :meth:`batches` fetches items concurrently and yields them
    collated, in key order.

    >>> import asyncio
    >>> from mlworkflow_async import DictDataset
    >>> ds = DictDataset({"a": 1, "b": 2, "c": 3})
    >>> async def main():
    ...     return [(keys, batch.tolist()) async for keys, batch in ds.batches(2)]
    >>> asyncio.run(main())
    [(['a', 'b'], [1, 2]), (['c'], [3])]

    A dataset is not bound to an event loop: it can be used from successive
    ``asyncio.run()`` calls and from :attr:`sync`, one loop at a time.
    """

    #: True when :meth:`query_items` fetches many items in one go, cheaper
    #: than item by item; :meth:`batches` then hands it whole batches.
    batched_queries: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        query_item = cls.__dict__.get("query_item")
        if (
            query_item is not None
            and inspect.isfunction(query_item)
            and not inspect.iscoroutinefunction(query_item)
        ):
            raise TypeError(
                f"{cls.__qualname__}.query_item is a plain `def`, but datasets are "
                f"asynchronous: declare it `async def query_item(self, key)`. To use a "
                f"blocking dataset as it is, wrap an instance with "
                f"`mlworkflow_async.from_sync(dataset)`, which runs it in worker threads."
            )

    @abstractmethod
    def yield_keys(self) -> Iterable[K] | AsyncIterable[K]:
        """Produce the keys: a (sync or async) generator, or any iterable.

        Returning a sized collection (a list, a tuple, ``dict.keys()``) makes
        the keys, and so ``len()``, known at once.
        """

    @abstractmethod
    async def query_item(self, key: K) -> V:
        """Fetch the item of ``key``."""

    # -- keys ------------------------------------------------------------

    @property
    def keys(self) -> KeySequence[K]:
        """The memoized keys: ``async for k in ds.keys`` or ``await ds.keys.all()``."""
        # Created lazily: subclasses are not required to call super().__init__.
        keys: KeySequence[K] | None = self.__dict__.get("_mlworkflow_keys")
        if keys is None:
            keys = self._new_keys()
            self.__dict__["_mlworkflow_keys"] = keys
        return keys

    def _new_keys(self) -> KeySequence[K]:
        """The key sequence :attr:`keys` memoizes; derived datasets may make another kind."""
        return KeySequence(self.yield_keys, type(self).__name__)

    def __len__(self) -> int:
        """The number of items, once the keys are complete.

        Raises :class:`~mlworkflow_async.exceptions.KeysNotReadyError`
        (a ``RuntimeError``) before that.
        """
        return len(self.keys)

    # -- items -----------------------------------------------------------

    async def query_items(self, keys: Sequence[K]) -> list[V]:
        """Fetch the items of ``keys``, in order.

        The default queries them concurrently; a backend that can fetch many
        items in one go overrides this (and sets :attr:`batched_queries`).
        """
        keys = list(keys)
        results: list[Any] = [None] * len(keys)

        async def fetch(index: int, key: K) -> None:
            try:
                results[index] = await self.query_item(key)
            except BaseException as exc:
                add_key_note(exc, key, self)
                raise

        if len(keys) == 1:
            await fetch(0, keys[0])
            return results
        try:
            async with anyio.create_task_group() as tg:
                for index, key in enumerate(keys):
                    tg.start_soon(fetch, index, key)
        except BaseExceptionGroup as group:
            # Several items may fail at once; report the first, as a single
            # fetch would, rather than a group the caller must unpack.
            raise group.exceptions[0] from None
        return results

    async def query(
        self,
        keys: Sequence[K],
        collate_fn: Callable[[list[V]], Any] | None = None,
        wrapper: Any = np.array,
    ) -> Any:
        """Fetch ``keys`` and collate them into one batch.

        ``collate_fn(items)`` builds the batch when given; otherwise
        :func:`~mlworkflow_async.batchify` does, with ``wrapper``.
        """
        items = await self.query_items(keys)
        return collate_fn(items) if collate_fn is not None else batchify(items, wrapper)

    def batches(
        self,
        batch_size: int,
        keys: AsyncIterable[K] | Iterable[K] | None = None,
        collate_fn: Callable[[list[V]], Any] | None = None,
        wrapper: Any = np.array,
        drop_incomplete: bool = False,
        concurrency: int | None = None,
    ) -> BatchStream[K]:
        """Stream ``(keys, batch)`` pairs in key order, fetching ahead.

        ``keys`` defaults to all the dataset's keys. ``concurrency`` bounds
        the items being fetched at once across the whole stream (default
        ``2 * batch_size``), so later batches load while earlier ones are
        being used. An item that raises ends the stream with its exception,
        which carries a note naming the key.

        >>> async def train(ds):
        ...     async for keys, batch in ds.batches(64, concurrency=256):
        ...         ...
        """
        if collate_fn is not None:
            collate = collate_fn
        else:
            def collate(items: list[V]) -> Any:
                return batchify(items, wrapper)
        return BatchStream(
            self,
            batch_size,
            self.keys if keys is None else keys,
            collate,
            drop_incomplete,
            2 * batch_size if concurrency is None else concurrency,
        )

    # -- blocking view ---------------------------------------------------

    @property
    def sync(self) -> SyncView[K, V]:
        """A blocking view of this dataset, for plain scripts.

        >>> from mlworkflow_async import DictDataset
        >>> ds = DictDataset({1: "a", 2: "b"})
        >>> ds.sync.keys.all(), ds.sync.query_item(2)
        ((1, 2), 'b')
        """
        from ..sync import SyncView

        return SyncView(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.keys!r}>"
