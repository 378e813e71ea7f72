"""A dataset deriving any number of child items from each item of another."""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections import deque
from collections.abc import AsyncIterable, Callable, Hashable, Iterable, Sequence
from itertools import chain
from operator import itemgetter, length_hint
from typing import Any, TypeVar, cast

from .._core._amap import map_concurrently, map_each
from .._core._callables import is_async_callable
from .._core._dataset import Dataset
from .._core._keys import KeySequence
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
    """

    def __init__(self, parent: Dataset[Any, Any], *, cached_roots: int = 128) -> None:
        if cached_roots < 1:
            raise ValueError(f"cached_roots must be at least 1, got {cached_roots}")
        self.parent = parent
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
        # A generator function always returns a generator: nothing to check per root.
        self._generator_augment = inspect.isgeneratorfunction(self.augment)
        self._roots_checked = False
        self._root_data = self._roots.data
        self._default_root_key = type(self).root_key is AugmentedDataset.root_key

    @abstractmethod
    def augment(
        self, root_key: Any, root_item: Any
    ) -> Iterable[tuple[K, V]] | AsyncIterable[tuple[K, V]]:
        """Generate the ``(child_key, child_item)`` pairs of one root item."""

    def root_key(self, key: K) -> Any:
        """The key of the root item ``key`` derives from: ``key[0]`` by default."""
        return key[0]  # type: ignore[index]

    @property
    def batched_queries(self) -> bool:  # type: ignore[override]
        # query_items() groups children by root and fetches the missing roots
        # in one parent call: whole batches are always cheaper than items.
        return True

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

    def _expand_sync(self, root_key: Any, root_item: Any) -> dict[K, V]:
        """The children of one root, by child key, in the order ``augment`` made them."""
        try:
            made = self.augment(root_key, root_item)
            try:
                pairs = iter(made)  # type: ignore[arg-type]
            except TypeError:
                raise self._not_pairs(made) from None
            children = dict(pairs)
        except Exception as exc:
            self._note(exc, root_key)
            raise
        if not self._roots_checked:
            self._check_roots(root_key, children)
        return children

    def _expand_many_sync(self, root_keys: list[Any], items: Sequence[Any]) -> list[dict[K, V]]:
        # The hot path of key discovery: many roots in one loop.
        if len(items) != len(root_keys):
            raise RuntimeError(
                f"{type(self.parent).__name__}.query_items() returned {len(items)} items "
                f"for {len(root_keys)} keys; it must return one item per key, in order"
            )
        if self._generator_augment:

            def noted(exc: Exception, index: int) -> None:
                self._note(exc, root_keys[index])

            groups: list[dict[K, V]] = map_each(
                dict, map(self.augment, root_keys, items), on_error=noted
            )
        else:
            groups = self._expand_each_sync(root_keys, items)
        if not self._roots_checked:
            for root_key, children in zip(root_keys, groups, strict=True):
                self._check_roots(root_key, children)
                if self._roots_checked:
                    break
        return groups

    def _expand_each_sync(self, root_keys: list[Any], items: Sequence[Any]) -> list[dict[K, V]]:
        """Root by root, checking that ``augment`` returned pairs at all."""
        augment = self.augment
        groups: list[dict[K, V]] = []
        root_key: Any = None
        made: Any = _UNSET
        try:
            for root_key, root_item in zip(root_keys, items, strict=True):
                made = _UNSET
                made = augment(root_key, root_item)
                groups.append(dict(made))
        except Exception as exc:
            if made is not _UNSET and not isinstance(made, Iterable):
                error = self._not_pairs(made)
                self._note(error, root_key)
                raise error from None
            self._note(exc, root_key)
            raise
        return groups

    async def _expand(self, root_key: Any, root_item: Any) -> dict[K, V]:
        if not self._async_augment:
            return self._expand_sync(root_key, root_item)
        try:
            made: Any = self.augment(root_key, root_item)
            if inspect.isawaitable(made):
                made = await made
            if isinstance(made, AsyncIterable):
                children = {child_key: child async for child_key, child in made}
            elif isinstance(made, Iterable):
                children = dict(made)
            else:
                raise self._not_pairs(made)
        except Exception as exc:
            self._note(exc, root_key)
            raise
        if not self._roots_checked:
            self._check_roots(root_key, children)
        return children

    async def _load_root(self, root_key: Any) -> dict[K, V]:
        root_item = await self.parent.query_item(root_key)
        if self._async_augment:
            return await self._expand(root_key, root_item)
        return self._expand_sync(root_key, root_item)

    async def _load_roots(self, root_keys: list[Any]) -> list[dict[K, V]]:
        items = await self.parent.query_items(root_keys)
        if not self._async_augment:
            return self._expand_many_sync(root_keys, items)
        pairs = list(zip(root_keys, items, strict=True))
        return await map_concurrently(lambda pair: self._expand(*pair), pairs)

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
        if self._generator_augment and self._roots_checked:
            items = await self.parent.query_items(root_keys)
            children = self._children_of_many(root_keys, items)
        else:
            children = {}
            deque(map(children.update, await self._load_roots(root_keys)), maxlen=0)
        self._discovered.add(children, self.keys.reach)
        return list(children)

    def _children_of_many(self, root_keys: list[Any], items: Sequence[Any]) -> dict[K, V]:
        """The children of many roots in one mapping: the hot path of key discovery.

        Made in one C-level pass, without a mapping per root; only for
        generator functions, which always return generators.
        """
        if len(items) != len(root_keys):
            raise RuntimeError(
                f"{type(self.parent).__name__}.query_items() returned {len(items)} items "
                f"for {len(root_keys)} keys; it must return one item per key, in order"
            )
        augment = cast(Callable[[Any, Any], Iterable[tuple[K, V]]], self.augment)
        remaining = iter(root_keys)
        try:
            return dict(chain.from_iterable(map(augment, remaining, items)))
        except Exception as exc:
            # Roots are taken one at a time, as their generator is needed.
            self._note(exc, root_keys[len(root_keys) - length_hint(remaining) - 1])
            raise

    # -- items -----------------------------------------------------------

    def _unknown(self, key: K, root_key: Any) -> KeyError:
        return KeyError(
            f"{key!r} is not a key of this {type(self).__name__}: augment() does not "
            f"make it from root key {root_key!r} (the root its root_key() names)"
        )

    async def query_item(self, key: K) -> V:
        try:
            # Keys read in order are in the chunk discovered last.
            return self._discovered.newest[key]
        except KeyError:
            pass
        child = self._discovered.get(key)
        if child is not MISSING:
            return child
        root_key = key[0] if self._default_root_key else self.root_key(key)  # type: ignore[index]
        # Roots leave in load order (no recency to refresh): a plain get.
        children = self._root_data.get(root_key)
        if children is None:
            children = await self._roots.load(root_key, self._load_root)
        try:
            return children[key]
        except KeyError:
            raise self._unknown(key, root_key) from None

    async def query_items(self, keys: Sequence[K]) -> list[V]:
        keys = list(keys)
        found = self._discovered.get_all(keys)
        if found is not None:
            return found
        values: list[Any] = list(map(self._discovered.get, keys))
        missing = [index for index, value in enumerate(values) if value is MISSING]
        queried = await self._query_roots([keys[index] for index in missing])
        for index, value in zip(missing, queried, strict=True):
            values[index] = value
        return values

    async def _query_roots(self, keys: list[K]) -> list[V]:
        """The children ``keys``, from their roots (held, in flight, or loaded in one call)."""
        if self._default_root_key:
            root_keys = list(map(itemgetter(0), keys))  # type: ignore[arg-type]
        else:
            root_keys = list(map(self.root_key, keys))
        unique = list(dict.fromkeys(root_keys))
        groups = dict(zip(unique, await self._roots.load_many(unique, self._load_roots),
                          strict=True))
        try:
            return [groups[root_key][key] for key, root_key in zip(keys, root_keys, strict=True)]
        except KeyError:
            pass
        for key, root_key in zip(keys, root_keys, strict=True):
            if key not in groups[root_key]:
                raise self._unknown(key, root_key) from None
        raise AssertionError("unreachable")  # pragma: no cover
