"""A dataset deriving any number of child items from each item of another."""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections.abc import AsyncIterable, Callable, Hashable, Iterable, Sequence
from itertools import chain
from operator import itemgetter, length_hint
from typing import Any, NoReturn, TypeVar, cast

from .._core._callables import is_async_callable
from .._core._dataset import Dataset
from .._core._engine import map_ordered, reader_concurrency
from .._core._executors import WorkerPool, worker_pool
from .._core._keys import KeySequence
from ..exceptions import UnhashableKeyError
from ._chunked_keys import ChunkedKeySequence, DerivedKeyChunks, Discovered, flatten_chunks
from ._derived import Derived
from ._memo import MISSING, Memo

__all__ = ["AugmentedDataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Roots augmented per step of key discovery: few at first so the first keys
# come quickly, more later to amortise the per-step cost.
_FIRST_CHUNK = 8
_LARGEST_CHUNK = 128
_UNSET: Any = object()
# What a copy sent to workers leaves behind: what only this process uses.
_RUNTIME = frozenset(
    {"parent", "_roots", "_discovered", "_pool", "_shipped", "_mlworkflow_keys"}
)


class AugmentedDataset(Derived[K, V]):
    """Zero, one or many child items made from each root item of ``parent``.

    Subclasses implement :meth:`augment`, a generator (sync or async) of
    ``(child_key, child_item)`` pairs for one root. Each child key must lead
    back to its root through :meth:`root_key`, which by default takes
    ``child_key[0]``.

    >>> import asyncio
    >>> from mlworkflow_async import DictDataset
    >>> class Doubled(AugmentedDataset):
    ...     def augment(self, root_key, root_item):
    ...         yield (root_key, "same"), root_item
    ...         yield (root_key, "reversed"), root_item[::-1]
    >>> ds = Doubled(DictDataset({1: "ab", 2: "cd"}))
    >>> async def main():
    ...     return [(key, await ds.query_item(key)) async for key in ds.keys]
    >>> asyncio.run(main())  # doctest: +NORMALIZE_WHITESPACE
    [((1, 'same'), 'ab'), ((1, 'reversed'), 'ba'),
     ((2, 'same'), 'cd'), ((2, 'reversed'), 'dc')]

    The children made while discovering keys are held for the queries that
    follow, as many as key discovery may run ahead of them (the keys a
    reader claims at once, such as a batch or a chunk of the blocking view,
    plus one step of discovery), so reading keys then querying them, by
    ``async for``, by batches or through the blocking view, augments each
    root once. A root queried otherwise is
    fetched and augmented once for all its children, concurrent queries
    included, and kept while it is among the ``cached_roots`` most recently
    queried roots; an older one is fetched and augmented again if asked for.
    ``len()`` works once all keys are known.

    ``executor`` runs ``augment`` elsewhere, a batch of roots per hop:
    ``"thread"``, ``"process"`` (a pool of ``workers``), any
    ``concurrent.futures.Executor`` or a ``dask.distributed.Client``, as for
    :class:`~mlworkflow_async.TransformedDataset`; the children come back.
    In other processes, ``augment`` is called on a copy of the dataset
    without its parent.
    """

    def __init__(
        self,
        parent: Dataset[Any, Any],
        *,
        cached_roots: int = 128,
        executor: Any = None,
        workers: int | None = None,
    ) -> None:
        if cached_roots < 1:
            raise ValueError(f"cached_roots must be at least 1, got {cached_roots}")
        self.parent = parent
        self._pool = worker_pool(executor, workers)
        self._shipped: Callable[..., Any] | None = None
        # Oldest loaded first out: children are mostly read in the order their
        # roots were loaded, and a root read already should not outlive one
        # whose children are still to be read.
        self._roots: Memo[Any, dict[K, V]] = Memo(cached_roots, lru=False)
        # Children made by key discovery, by child key, for the queries that follow.
        self._discovered: Discovered[K, V] = Discovered()
        # Decided once: a plain generator is then run inline, without awaiting.
        self._async_augment = is_async_callable(self.augment) or inspect.isasyncgenfunction(
            self.augment
        )
        self._roots_checked = False
        self._default_root_key = type(self).root_key is AugmentedDataset.root_key

    @abstractmethod
    def augment(
        self, root_key: Any, root_item: Any
    ) -> Iterable[tuple[K, V]] | AsyncIterable[tuple[K, V]]:
        """Generate the ``(child_key, child_item)`` pairs of one root item."""

    def root_key(self, key: K) -> Any:
        """The key of the root item ``key`` derives from: ``key[0]`` by default."""
        return key[0]  # type: ignore[index]

    # query_items() groups children by root and fetches the missing roots in
    # one parent call: whole batches are always cheaper than items.
    batched_queries = True

    # -- augmenting ------------------------------------------------------

    def _check_roots(self, root_key: Any, children: dict[K, V]) -> None:
        """Fail early, on the first augmented root, if root_key() does not match augment()."""
        root_of = self.root_key
        for child_key in children:
            try:
                found = root_of(child_key)
            except Exception as exc:
                exc.add_note(
                    f"{type(self).__name__}.root_key() failed on child key {child_key!r} "
                    f"of root key {root_key!r}; override root_key() to match augment()"
                )
                raise
            if found != root_key:
                raise ValueError(
                    f"{type(self).__name__}.augment() made child key {child_key!r} from root "
                    f"key {root_key!r}, but root_key() maps that child to {found!r}; "
                    f"override root_key() to match augment()"
                )
        if children:
            # One root shows whether the two agree; checking every child would
            # cost a call each, and a later mismatch still fails at query time.
            self._roots_checked = True

    def _note(self, exc: BaseException, root_key: Any) -> None:
        exc.add_note(f"while augmenting root key {root_key!r} in {type(self).__name__}.augment()")

    def _not_pairs(self, made: object) -> TypeError:
        return TypeError(
            f"{type(self).__name__}.augment() returned {type(made).__name__}; it must be a "
            f"generator or an async generator of (child_key, child_item) pairs"
        )

    def _children(self, root_key: Any, pairs: list[tuple[K, V]]) -> dict[K, V]:
        children = dict(pairs)
        if len(children) != len(pairs):
            seen: set[K] = set()
            for child_key, _ in pairs:
                if child_key in seen:
                    raise ValueError(
                        f"{type(self).__name__}.augment() made child key {child_key!r} twice "
                        f"from root key {root_key!r}; every child key must be unique"
                    )
                seen.add(child_key)
        if not self._roots_checked:
            self._check_roots(root_key, children)
        return children

    async def _augment_one(self, root_key: Any, root_item: Any) -> list[tuple[K, V]]:
        """The ``(child_key, child_item)`` pairs of one root, as ``augment`` made them."""
        made: Any = None
        try:
            made = self.augment(root_key, root_item)
            if inspect.isawaitable(made):
                made = await made
            is_async = isinstance(made, AsyncIterable)
            return [pair async for pair in made] if is_async else list(made)
        except Exception as exc:
            if made is not None and not isinstance(made, Iterable | AsyncIterable):
                error = self._not_pairs(made)
                self._note(error, root_key)
                raise error from None
            self._note(exc, root_key)
            raise

    async def _load_roots(
        self, root_keys: list[Any], concurrency: int | None = None
    ) -> list[list[tuple[K, V]]]:
        """Fetch roots in one parent call (at most ``concurrency`` fetches at once)
        and augment them: the one path to children.

        Returns each root's pairs as made; callers index them as they need
        (one mapping of every child for key discovery, one per root for
        queries), which also checks that child keys are unique.
        """
        items = await self._parent_items(root_keys, concurrency)
        pool = self._pool
        if pool is not None and not (self._async_augment and pool.in_threads):
            made = await self._augment_in_pool(pool, root_keys, items)
        elif self._async_augment:
            made = await map_ordered(
                lambda index: self._augment_one(root_keys[index], items[index]),
                range(len(root_keys)),
                len(root_keys),
                self,
            )
        else:
            made = self._augment_all(root_keys, items)
        if not self._roots_checked:
            for root_key, pairs in zip(root_keys, made, strict=True):
                if pairs:
                    self._check_roots(root_key, self._children(root_key, pairs))
                    break
        return made

    async def _load_root_groups(
        self, root_keys: list[Any], concurrency: int | None = None
    ) -> list[dict[K, V]]:
        """The children of each root, by child key: what queries look up."""
        made = await self._load_roots(root_keys, concurrency)
        return [self._children(k, pairs) for k, pairs in zip(root_keys, made, strict=True)]

    def _augment_all(self, root_keys: list[Any], items: list[Any]) -> list[list[tuple[K, V]]]:
        """Plain ``augment``: every root of the batch in C-level passes, no await per root."""
        made: list[list[tuple[K, V]]] = []
        try:
            augment = cast(Callable[[Any, Any], Iterable[tuple[K, V]]], self.augment)
            made.extend(map(list, map(augment, root_keys, items)))
        except Exception as exc:
            self._raise_failed(exc, root_keys[len(made)], items[len(made)])
        return made

    def _raise_failed(self, exc: Exception, root_key: Any, root_item: Any) -> NoReturn:
        """Raise what ``augment`` on this root did wrong, noted with its root key.

        A ``TypeError`` may mean it returned no pairs at all: that is said plainly.
        """
        if isinstance(exc, TypeError):
            result = self.augment(root_key, root_item)
            if not isinstance(result, Iterable):
                error = self._not_pairs(result)
                self._note(error, root_key)
                raise error from None
        self._note(exc, root_key)
        raise exc

    async def _augment_in_pool(
        self, pool: WorkerPool, root_keys: list[Any], items: list[Any]
    ) -> list[list[tuple[K, V]]]:
        if self._shipped is None:
            copy = self._for_workers()
            self._shipped = _ExpandAsync(copy) if self._async_augment else _Expand(copy)

        def noted(exc: BaseException, index: int) -> None:
            self._note(exc, root_keys[index])

        groups = await pool.run_batch(
            self._shipped, list(zip(root_keys, items, strict=True)), keys=root_keys,
            on_error=noted,
        )
        return [list(pairs) for pairs in groups]

    def _for_workers(self) -> AugmentedDataset[K, V]:
        """A copy of this dataset for the workers to call ``augment`` on: its
        settings, without its parent, held children or pool."""
        copy = object.__new__(type(self))
        copy.__dict__.update(
            (name, value) for name, value in self.__dict__.items() if name not in _RUNTIME
        )
        return copy

    # -- keys ------------------------------------------------------------

    def _new_keys(self) -> KeySequence[K]:
        return ChunkedKeySequence(self._key_chunks, type(self).__name__)

    def _key_chunks(self) -> DerivedKeyChunks[K]:
        return DerivedKeyChunks(
            self.parent.keys, self._children_keys, _FIRST_CHUNK, _LARGEST_CHUNK
        )

    def yield_keys(self) -> Any:
        return flatten_chunks(self._key_chunks())

    async def _children_keys(self, root_keys: Sequence[Any]) -> list[K]:
        root_keys = list(root_keys)
        concurrency = reader_concurrency()  # a stream's bound holds for its discovery too
        if self._roots_checked and self._pool is None and not self._async_augment:
            # The hot path of discovery (benchmark W1): every root's generator
            # drained into one list in one C-level pass, with no list per root.
            items = await self._parent_items(root_keys, concurrency)
            pairs = self._augment_flat(root_keys, items)
            children: dict[K, V] = dict(pairs)
            if len(children) != len(pairs):
                # To name the roots, augment them again one by one (errors only).
                self._shared_child(root_keys, self._augment_all(root_keys, items))
        else:
            made = await self._load_roots(root_keys, concurrency)
            children = dict(chain.from_iterable(made))
            if len(children) != sum(map(len, made)):
                self._shared_child(root_keys, made)
        self._discovered.add(children, self.keys.reach)
        return list(children)

    def _augment_flat(self, root_keys: list[Any], items: list[Any]) -> list[tuple[K, V]]:
        """The pairs of every root, one after the other, as :meth:`_augment_all` makes them."""
        augment = cast(Callable[[Any, Any], Iterable[tuple[K, V]]], self.augment)
        remaining = iter(root_keys)
        try:
            return list(chain.from_iterable(map(augment, remaining, items)))
        except Exception as exc:
            # map() takes a root as chain() needs its generator: the last one taken failed.
            index = len(root_keys) - length_hint(remaining) - 1
            self._raise_failed(exc, root_keys[index], items[index])

    def _shared_child(self, root_keys: list[Any], made: list[list[tuple[K, V]]]) -> None:
        """Raise for the child key that two roots, or one root twice, made."""
        groups = [self._children(k, pairs) for k, pairs in zip(root_keys, made, strict=True)]
        owner: dict[K, Any] = {}
        for root_key, group in zip(root_keys, groups, strict=True):
            for child_key in group:
                if child_key in owner:
                    raise ValueError(
                        f"{type(self).__name__}.augment() made child key {child_key!r} from "
                        f"root keys {owner[child_key]!r} and {root_key!r}; every child key "
                        f"must be unique"
                    )
                owner[child_key] = root_key

    # -- items -----------------------------------------------------------

    def _unknown(self, key: K, root_key: Any) -> KeyError:
        return KeyError(
            f"{key!r} is not a key of this {type(self).__name__}: augment() does not "
            f"make it from root key {root_key!r} (the root its root_key() names)"
        )

    async def query_item(self, key: K) -> V:
        """The child ``key``: held since its key was derived, else from its root.

        The one-key form of :meth:`query_items`, without building lists: a loop
        of ``query_item`` over freshly derived keys spends most of its time here
        (benchmark W1, key by key).
        """
        try:
            value = self._discovered.newest.get(key, MISSING)
        except TypeError:
            UnhashableKeyError.check(self, (key,))
            raise
        if value is MISSING:
            value = self._discovered.get(key)
            if value is MISSING:
                return (await self._query_roots([key]))[0]
        return value

    async def query_items(
        self, keys: Sequence[K], concurrency: int | None = None
    ) -> list[V]:
        keys = list(keys)
        try:
            found = self._discovered.get_all(keys)
        except TypeError:
            UnhashableKeyError.check(self, keys)
            raise
        if found is not None:
            return found
        values: list[Any] = list(map(self._discovered.get, keys))
        missing = [index for index, value in enumerate(values) if value is MISSING]
        queried = await self._query_roots([keys[index] for index in missing], concurrency)
        for index, value in zip(missing, queried, strict=True):
            values[index] = value
        return values

    async def _query_roots(self, keys: list[K], concurrency: int | None = None) -> list[V]:
        """The children ``keys``, from their roots (held, in flight, or loaded in one call,
        at most ``concurrency`` fetches at once)."""
        if self._default_root_key:
            root_keys = list(map(itemgetter(0), keys))  # type: ignore[arg-type]
        else:
            root_keys = list(map(self.root_key, keys))
        unique = list(dict.fromkeys(root_keys))
        loaded = await self._roots.load_many(
            unique, lambda roots: self._load_root_groups(roots, concurrency)
        )
        groups = dict(zip(unique, loaded, strict=True))
        try:
            return [groups[root_key][key] for key, root_key in zip(keys, root_keys, strict=True)]
        except KeyError:
            pass
        for key, root_key in zip(keys, root_keys, strict=True):
            if key not in groups[root_key]:
                raise self._unknown(key, root_key) from None
        raise AssertionError("unreachable")  # pragma: no cover


class _Expand:
    """``augment`` over one root, as a worker runs it: the list of its children."""

    def __init__(self, dataset: AugmentedDataset[Any, Any]) -> None:
        self.dataset = dataset
        self.__qualname__ = f"{type(dataset).__qualname__}.augment"

    def __call__(self, root_key: Any, root_item: Any) -> list[Any]:
        made = self.dataset.augment(root_key, root_item)
        if not isinstance(made, Iterable):
            raise self.dataset._not_pairs(made)
        return list(made)


class _ExpandAsync(_Expand):
    async def __call__(self, root_key: Any, root_item: Any) -> list[Any]:  # type: ignore[override]
        made: Any = self.dataset.augment(root_key, root_item)
        if inspect.isawaitable(made):
            made = await made
        if isinstance(made, AsyncIterable):
            return [pair async for pair in made]
        if not isinstance(made, Iterable):
            raise self.dataset._not_pairs(made)
        return list(made)
