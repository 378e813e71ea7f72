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
import numbers
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Awaitable, Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from ..exceptions import ItemCountError
from ._callables import takes_keyword
from ._collate import Collate, collate_batch, make_collate, name_batch
from ._engine import Engine, OnError, map_ordered
from ._keys import KeySequence
from ._order import KnownOrder, StreamedOrder, StreamSpec
from ._stream import BatchStream

if TYPE_CHECKING:
    from ..sync import SyncView

__all__ = ["Dataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Fetches in flight at once by default in ``query_items`` and ``query``.
QUERY_CONCURRENCY = 64


def _definer(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in klass.__dict__)


def _more_derived(cls: type, a: type, b: type) -> bool:
    """Whether ``a`` comes before ``b`` in ``cls``'s MRO: a mixin counts, not just a subclass."""
    return a is not b and cls.__mro__.index(a) < cls.__mro__.index(b)


def _item_via_items(bulk: Callable[..., Awaitable[Sequence[Any]]]) -> Callable[..., Any]:
    """A ``query_item`` for a class whose ``query_items`` is its own fetch."""

    async def query_item(self: Dataset[Any, Any], key: Any) -> Any:
        items = await bulk(self, [key])
        ItemCountError.check(self, items, [key])
        return items[0]

    query_item.__doc__ = "Fetch the item of ``key`` (one key of :meth:`query_items`)."
    return query_item


async def bounded_items(
    dataset: Dataset[Any, Any], keys: Sequence[Any], concurrency: int | None
) -> Sequence[Any]:
    """``dataset.query_items(keys)``, at most ``concurrency`` fetches at once where it
    takes that bound: a backend's own ``query_items`` may take keys only."""
    if concurrency is not None and takes_keyword(dataset.query_items, "concurrency"):
        return await dataset.query_items(keys, concurrency=concurrency)
    return await dataset.query_items(keys)


def bounded_batch(
    dataset: Dataset[Any, Any], collate: Collate, concurrency: int | None
) -> Callable[[Sequence[Any]], Awaitable[Any]]:
    """What fetches and collates each batch of keys of ``dataset``: its
    ``query_batch``, at most ``concurrency`` fetches at once in the default one
    (a backend's own reads a batch its way, and takes no such bound)."""
    if concurrency is not None and type(dataset).query_batch is Dataset.query_batch:
        return lambda keys: _collated(dataset, keys, collate, concurrency)
    return lambda keys: _own_batch(dataset, keys, collate)


async def _own_batch(dataset: Dataset[Any, Any], keys: Sequence[Any], collate: Collate) -> Any:
    try:
        return await dataset.query_batch(keys, collate)
    except Exception as exc:
        name_batch(exc, keys)
        raise


async def _collated(
    dataset: Dataset[Any, Any], keys: Sequence[Any], collate: Collate, concurrency: int | None
) -> Any:
    keys = list(keys)
    items = list(await bounded_items(dataset, keys, concurrency))
    ItemCountError.check(dataset, items, keys)
    try:
        return await collate_batch(items, collate)
    except Exception as exc:
        name_batch(exc, keys)
        raise


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer of at least 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return int(value)


def _check_shard(shard: object) -> tuple[int, int] | None:
    if shard is None:
        return None
    if (
        not isinstance(shard, tuple | list)
        or len(shard) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in shard)
    ):
        raise TypeError(f"shard must be a pair of integers (rank, world_size), got {shard!r}")
    rank, world = int(shard[0]), int(shard[1])
    if world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"shard=(rank, world_size) needs world_size >= 1 and 0 <= rank < world_size, "
            f"got {shard!r}"
        )
    return rank, world


def _check_max_failures(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"max_failures must be None, a count or a fraction, got {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"max_failures must be at least 0, got {value!r}")
        return int(value)
    if not 0 < float(value) < 1:
        raise ValueError(
            f"max_failures as a fraction of the items seen must be between 0 and 1, "
            f"got {value!r}; pass an int for a count"
        )
    return float(value)


class Dataset(ABC, Generic[K, V]):
    """Abstract base of every dataset.

    A subclass implements :meth:`yield_keys`, and fetches items in one of two
    ways, which :class:`Dataset` checks when the class is defined:

    - ``async def query_item(self, key)``, one item at a time: batches then
      run up to ``concurrency`` fetches at once;
    - or ``async def query_items(self, keys)`` with ``batched_queries = True``,
      for backends that fetch many items in one go: batches then make one
      call per batch, and ``query_item`` comes from ``query_items``.

    Every other way to read items (``query``, ``batches``, the ``sync``
    view, the combinators) goes through the method the class defines, so a
    subclass that overrides ``query_item`` of a bulk backend is respected
    everywhere: its inherited bulk methods are reset to the item-by-item ones.

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

    #: True when :meth:`query_items` is the dataset's own way to fetch many
    #: items at once; :meth:`batches` then hands it whole batches.
    batched_queries: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("query_item", "query_items", "query_batch"):
            method = cls.__dict__.get(name)
            if (
                method is not None
                and inspect.isfunction(method)
                and not inspect.iscoroutinefunction(method)
            ):
                raise TypeError(
                    f"{cls.__qualname__}.{name} is a plain `def`, but datasets are "
                    f"asynchronous: declare it `async def {name}(self, ...)`. To use a "
                    f"blocking dataset as it is, wrap an instance with "
                    f"`mlworkflow_async.from_sync(dataset)`, which runs it in worker threads."
                )
        item, items, batch = (
            _definer(cls, name) for name in ("query_item", "query_items", "query_batch")
        )
        blocking = _definer(cls, "_blocking_items")
        if blocking is not Dataset and (
            _more_derived(cls, item, blocking) or _more_derived(cls, items, blocking)
        ):
            # A subclass with fetches of its own is read through them, blocking too.
            cls._blocking_items = Dataset._blocking_items  # type: ignore[method-assign]
        if item is not Dataset and _more_derived(cls, item, items):
            # query_item is the newest word on items: every bulk path follows it.
            if items is not Dataset:
                cls.query_items = Dataset.query_items  # type: ignore[method-assign]
                cls.batched_queries = False
            if batch is not Dataset:
                cls.query_batch = Dataset.query_batch  # type: ignore[method-assign]
            return
        if items is Dataset:
            return
        if items is cls and "query_item" not in cls.__dict__:
            cls.query_item = _item_via_items(  # type: ignore[method-assign]
                cls.__dict__["query_items"]
            )
        if batch is not Dataset and _more_derived(cls, items, batch):
            cls.query_batch = Dataset.query_batch  # type: ignore[method-assign]
        declared = inspect.getattr_static(cls, "batched_queries")
        if declared is False and item is not items:
            raise TypeError(
                f"{cls.__qualname__} defines query_items() as its way to fetch items, so it "
                f"must declare `batched_queries = True` (batches then make one call per "
                f"batch); or define `async def query_item(self, key)` instead"
            )

    @abstractmethod
    def yield_keys(self) -> Iterable[K] | AsyncIterable[K]:
        """Produce the keys: a (sync or async) generator, or any iterable.

        Returning a sized collection (a list, a tuple, ``dict.keys()``) makes
        the keys, and so ``len()``, known at once.
        """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if _definer(cls, "query_item") is Dataset and _definer(cls, "query_items") is Dataset:
            raise TypeError(
                f"cannot instantiate {cls.__qualname__}: a dataset defines "
                f"`async def query_item(self, key)`, or `async def query_items(self, keys)` "
                f"with `batched_queries = True`"
            )
        return super().__new__(cls)

    async def query_item(self, key: K) -> V:
        """Fetch the item of ``key``.

        A subclass defines this, or :meth:`query_items` (with
        ``batched_queries = True``), from which this then comes.
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not define query_item()")

    def _blocking_items(self, keys: Sequence[K]) -> list[V] | None:
        """The items of ``keys`` read on the calling thread, or None (the default).

        :attr:`sync` asks this first. A dataset whose reads are plain blocking
        calls (a file's reads, a dict's lookups) serves them here, sparing a
        blocking call the round trip to the event loop's thread (about 0.1 ms).
        It must give what :meth:`query_items` gives; a subclass that overrides
        ``query_item`` or ``query_items`` goes back to None.
        """
        return None

    def _batches_ahead(self) -> int:
        """Batches :meth:`batches` fetches at once by default: one in use, one loading."""
        return 2

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

    async def query_items(
        self, keys: Sequence[K], concurrency: int | None = None
    ) -> list[V]:
        """Fetch the items of ``keys``, in order, at most ``concurrency`` at once (default 64).

        The first failure cancels the rest and propagates, with a note naming
        its key. A bulk backend overrides this (with ``batched_queries``).
        """
        limit = QUERY_CONCURRENCY if concurrency is None else _positive_int(
            concurrency, "concurrency"
        )
        return await map_ordered(self.query_item, list(keys), limit, self)

    async def query_batch(self, keys: Sequence[K], collate: Collate) -> Any:
        """Fetch ``keys`` and collate them: what :meth:`batches` calls per batch of a bulk backend.

        The default collates :meth:`query_items` (given the ``concurrency`` of
        the stream or the query); large arrays are collated in a worker
        thread. A backend may build the batch itself, for instance when
        ``collate`` is :data:`~mlworkflow_async._core._collate.DEFAULT_COLLATE`.
        """
        return await _collated(self, keys, collate, None)

    async def query(
        self,
        keys: Sequence[K],
        collate_fn: Callable[[list[V]], Any] | None = None,
        wrapper: Any = np.array,
        *,
        concurrency: int | None = None,
    ) -> Any:
        """Fetch ``keys`` and collate them into one batch.

        ``collate_fn(items)`` builds the batch when given; otherwise
        :func:`~mlworkflow_async.batchify` does, with ``wrapper``.
        ``concurrency`` bounds the fetches in flight, as in :meth:`query_items`.
        """
        collate = make_collate(collate_fn, wrapper)
        keys = list(keys)
        if self.batched_queries:
            return await bounded_batch(self, collate, concurrency)(keys)
        return await _collated(self, keys, collate, concurrency)

    def batches(
        self,
        batch_size: int,
        keys: AsyncIterable[K] | Iterable[K] | None = None,
        collate_fn: Callable[[list[V]], Any] | None = None,
        wrapper: Any = np.array,
        drop_incomplete: bool = False,
        concurrency: int | None = None,
        *,
        shuffle: int | None = None,
        epoch: int = 0,
        shard: tuple[int, int] | None = None,
        ordered: bool = True,
        resume: dict[str, Any] | None = None,
        on_error: OnError = "raise",
        max_failures: float | None = None,
        progress: bool = False,
    ) -> BatchStream[K]:
        """Stream ``(keys, batch)`` pairs, fetching ahead.

        - ``keys``: the keys to read (default: all the dataset's, as they are
          discovered); ``concurrency`` bounds the items fetched at once
          (default ``2 * batch_size``, and ``(workers + 2) * batch_size``
          when a stage runs in a pool of ``workers``), so later batches load
          while earlier ones are used.
        - ``shuffle=seed``, ``epoch=e``: a permutation of the keys that
          depends only on them, the seed and the epoch (the same in every
          process and machine). It needs every key, so the stream first
          awaits them.
        - ``shard=(rank, world_size)``: this rank's part of the epoch; every
          key goes to exactly one rank (ranks agree on the shuffled order
          first). With ``drop_incomplete=True`` every rank gets the same
          number of batches.
        - ``ordered=False``: batches come as they complete, so a slow item
          delays only its own batch.
        - ``resume=stream.state_dict()``: continue a stream exactly where it
          was, in this process or another, without reading anything twice.
        - ``on_error="skip"``: an item that raises is left out of its batch
          (a batch left with no item is dropped) and recorded in
          ``stream.failures``, and so is a key whose
          discovery raises (a predicate or an ``augment()`` failing for it),
          which is then left out of the dataset's keys; ``max_failures`` (a
          count, or a fraction of the items seen) makes the stream raise past it.
        - ``progress=True``: a tqdm progress bar.

        >>> async def train(ds):
        ...     for epoch in range(3):
        ...         async for keys, batch in ds.batches(64, shuffle=0, epoch=epoch):
        ...             ...
        """
        size = _positive_int(batch_size, "batch_size")
        if isinstance(keys, type) or (
            keys is not None
            and callable(keys)
            and not isinstance(keys, Iterable | AsyncIterable)
        ):
            raise TypeError(
                f"the second positional parameter of batches() is keys (the keys to read), "
                f"got {keys!r}; did you mean wrapper={getattr(keys, '__name__', keys)}?"
            )
        if keys is not None and not isinstance(keys, Iterable | AsyncIterable):
            raise TypeError(f"keys must be an iterable of keys (or None for all), got {keys!r}")
        limit = (
            self._batches_ahead() * size if concurrency is None
            else _positive_int(concurrency, "concurrency")
        )
        if shuffle is not None and (
            isinstance(shuffle, bool) or not isinstance(shuffle, numbers.Integral)
        ):
            raise TypeError(
                f"shuffle takes an integer seed (shuffle=0, say), got {shuffle!r}; the seed "
                f"is what makes the order reproducible"
            )
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise TypeError(f"epoch must be an integer of at least 0, got {epoch!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
        spec = StreamSpec(
            size,
            None if shuffle is None else int(shuffle),
            int(epoch),
            _check_shard(shard),
            bool(drop_incomplete),
            bool(ordered),
        )
        return BatchStream(
            self,
            self.keys if keys is None else keys,
            make_collate(collate_fn, wrapper),
            spec,
            limit,
            on_error,
            _check_max_failures(max_failures),
            resume,
            bool(progress),
        )

    def _engine(
        self,
        keys: KeySequence[K] | Iterable[K] | AsyncIterable[K],
        unit_size: int,
        concurrency: int,
    ) -> Engine[K]:
        """An engine fetching ``keys`` in units (lists of items), the way this dataset fetches.

        Keys known in advance are claimed without awaiting; others as they come.
        """
        order: KnownOrder[K] | StreamedOrder[K]
        if isinstance(keys, KeySequence) and keys.complete:
            order = KnownOrder(keys.known_list(), unit_size)
        elif isinstance(keys, Sequence):
            order = KnownOrder(keys, unit_size)
        else:
            order = StreamedOrder(keys, unit_size)
            if isinstance(keys, KeySequence):
                keys.claim(order, unit_size)
        if self.batched_queries:

            async def fetch_unit(unit: list[K]) -> list[V]:
                items = list(await bounded_items(self, unit, concurrency))
                ItemCountError.check(self, items, unit)
                return items

            return Engine(order, owner=self, concurrency=concurrency, fetch_unit=fetch_unit)
        return Engine(order, owner=self, concurrency=concurrency, fetch_item=self.query_item)

    # -- blocking view ---------------------------------------------------

    @property
    def sync(self) -> SyncView[K, V]:
        """A blocking view of this dataset, for plain scripts.

        >>> from mlworkflow_async import DictDataset
        >>> ds = DictDataset({1: "a", 2: "b"})
        >>> ds.sync.keys.all(), ds.sync.query_item(2)
        ([1, 2], 'b')
        """
        from ..sync import SyncView

        return SyncView(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.keys!r}>"
