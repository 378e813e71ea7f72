"""A dataset keeping the items of another that pass a predicate."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from itertools import compress
from operator import not_
from types import CoroutineType
from typing import Any, TypeVar

import numpy as np

from .._core._amap import map_concurrently, map_each
from .._core._callables import describe, is_async_callable, positional_arity
from .._core._dataset import Dataset
from .._core._engine import add_key_note
from .._core._keys import KeySequence
from ._chunked_keys import ChunkedKeySequence, DerivedKeyChunks, Discovered, flatten_chunks
from ._derived import Derived
from ._memo import MISSING

__all__ = ["FilteredDataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Parent keys judged per step of key discovery: small at first so the first
# keys come quickly, larger later to amortise the per-step cost.
_FIRST_CHUNK = 16
_KEY_CHUNK = 1024


class FilteredDataset(Derived[K, V]):
    """The keys and items of ``parent`` that ``predicate`` keeps.

    A one-argument predicate is called with the key only, so filtering never
    fetches an item: prefer it when the key says enough. A two-argument
    predicate is called with ``(key, item)``. Either may be a plain function
    or an ``async def``, and must return a bool (numpy bools are fine);
    ``keep_positive=False`` keeps the items it rejects instead.

    >>> import asyncio
    >>> from mlworkflow_async import DictDataset
    >>> parent = DictDataset({1: "a", 2: "b", 3: "c", 4: "d"})
    >>> by_key = FilteredDataset(parent, lambda k: k % 2 == 0)
    >>> by_pair = FilteredDataset(parent, lambda k, v: v in "ac")
    >>> async def main():
    ...     return await by_key.keys.all(), await by_pair.query_items(await by_pair.keys.all())
    >>> asyncio.run(main())
    ((2, 4), ['a', 'c'])

    Keys are discovered lazily, so ``len()`` works once they all are. The
    keys accepted while discovering them are remembered, and the items a
    pair predicate fetched to judge them are held until queried once, as far
    as key discovery may run ahead of the queries (the keys a reader claims
    at once, such as a batch or a chunk of the blocking view, plus one step
    of discovery), and for at least ``buffer_size`` items (0 holds none). So iterating keys
    then querying them, by ``async for``, by batches or through the blocking
    view, judges each key and fetches each item once; a key queried long
    after it was discovered is judged again.
    """

    parent: Dataset[K, V]

    def __init__(
        self,
        parent: Dataset[K, V],
        predicate: Callable[..., bool | Awaitable[bool]],
        keep_positive: bool = True,
        *,
        buffer_size: int = 256,
    ) -> None:
        arity = positional_arity(predicate)
        if arity not in (1, 2):
            found = "a variable number of" if arity is None else str(arity)
            raise TypeError(
                f"the predicate of a FilteredDataset takes the key (one argument) or the key "
                f"and the item (two arguments), but {describe(predicate)} takes {found} "
                f"positional arguments; wrap it, e.g. `lambda key, item: ...`"
            )
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be at least 0, got {buffer_size}")
        self.parent = parent
        self.predicate = predicate
        self.keep_positive = bool(keep_positive)
        #: True when the predicate judges ``(key, item)`` pairs, False for keys only.
        self.by_pairs = arity == 2
        self.buffer_size = buffer_size
        self._async = is_async_callable(predicate)
        self._sync_keys = not self._async and not self.by_pairs
        # Items fetched to judge pairs, until their first query.
        self._pending: Discovered[K, V] = Discovered(buffer_size)
        # Keys accepted by key discovery (values unused): not judged again.
        self._vetted: Discovered[K, bool] = Discovered()



    # -- judging ---------------------------------------------------------

    def _verdict(self, key: K, result: object) -> bool:
        """``result`` as a bool; the fast path (a real bool) is inlined by callers."""
        if result is True or result is False:
            return result
        if isinstance(result, np.bool_):
            return bool(result)
        if type(result) is CoroutineType:
            result.close()
            raise TypeError(
                f"the predicate {describe(self.predicate)} returned a coroutine for key "
                f"{key!r}: declare it `async def` so that the dataset awaits it"
            )
        raise TypeError(
            f"the predicate {describe(self.predicate)} returned a value of type "
            f"{type(result).__name__} for key {key!r}, but it must return a bool; convert "
            f"explicitly, e.g. "
            f"`lambda k: bool(...)`, if truthiness is really meant"
        )

    def _note(self, exc: BaseException, key: K) -> None:
        exc.add_note(f"raised by predicate {describe(self.predicate)}")
        add_key_note(exc, key, self)

    def _keeps_sync(self, key: K, *item: Any) -> bool:
        try:
            result = self.predicate(key, *item)
            if result is not True and result is not False:
                result = self._verdict(key, result)
        except Exception as exc:
            self._note(exc, key)
            raise
        return result is self.keep_positive

    async def _keeps(self, key: K, *item: Any) -> bool:
        if not self._async:
            return self._keeps_sync(key, *item)
        try:
            result = await self.predicate(key, *item)  # type: ignore[misc]
            if result is not True and result is not False:
                result = self._verdict(key, result)
        except Exception as exc:
            self._note(exc, key)
            raise
        return result is self.keep_positive

    def _judge_sync(self, keys: Sequence[K], items: Sequence[V] | None) -> list[bool]:
        """Keep or not, for many keys at once: the hot path, looping in C."""

        def noted(exc: Exception, index: int) -> None:
            self._note(exc, keys[index])

        results: list[Any]
        if items is None:
            results = map_each(self.predicate, keys, on_error=noted)
        else:
            if len(items) != len(keys):
                raise RuntimeError(
                    f"{type(self.parent).__name__}.query_items() returned {len(items)} items "
                    f"for {len(keys)} keys; it must return one item per key, in order"
                )
            results = map_each(self.predicate, keys, items, on_error=noted)
        if not {bool}.issuperset(map(type, results)):
            try:
                results = [
                    result if type(result) is bool else self._verdict(key, result)
                    for key, result in zip(keys, results, strict=True)
                ]
            except TypeError:
                for result in results:  # the first one is closed already
                    if type(result) is CoroutineType:
                        result.close()
                raise
        return results if self.keep_positive else list(map(not_, results))

    async def _keeps_all(self, keys: Sequence[K], items: Sequence[V] | None) -> list[bool]:
        if not self._async:
            return self._judge_sync(keys, items)
        if items is None:
            return await map_concurrently(self._keeps, keys)
        pairs = list(zip(keys, items, strict=True))
        return await map_concurrently(lambda pair: self._keeps(*pair), pairs)

    def _rejected(self, key: K) -> KeyError:
        return KeyError(
            f"{key!r} is not a key of this FilteredDataset: "
            f"its predicate {describe(self.predicate)} filters it out"
        )

    # -- keys ------------------------------------------------------------

    def _new_keys(self) -> KeySequence[K]:
        return ChunkedKeySequence(self._key_chunks, type(self).__name__)

    def _key_chunks(self) -> DerivedKeyChunks[K]:
        if self.by_pairs:
            # Items judged are held until queried: keep a chunk well within the buffer.
            return DerivedKeyChunks(
                self.parent.keys, self._vet_pairs, _FIRST_CHUNK, self.buffer_size // 2
            )
        return DerivedKeyChunks(self.parent.keys, self._vet_keys, _FIRST_CHUNK, _KEY_CHUNK)

    def yield_keys(self) -> Any:
        return flatten_chunks(self._key_chunks())

    async def _vet_keys(self, keys: Sequence[K]) -> list[K]:
        kept = list(compress(keys, await self._keeps_all(keys, None)))
        self._vetted.add(dict.fromkeys(kept, True), self.keys.reach)
        return kept

    async def _vet_pairs(self, keys: Sequence[K]) -> list[K]:
        items = await self.parent.query_items(keys)
        verdicts = await self._keeps_all(keys, items)
        kept = list(compress(keys, verdicts))
        if self.buffer_size:
            self._pending.add(
                dict(zip(kept, compress(items, verdicts), strict=True)), self.keys.reach
            )
        return kept

    # -- items -----------------------------------------------------------

    async def query_item(self, key: K) -> V:
        if self._sync_keys:
            # Inline: the hot path of key predicates.
            if key not in self._vetted.newest and key not in self._vetted:
                try:
                    result = self.predicate(key)
                except Exception as exc:
                    self._note(exc, key)
                    raise
                keep = self.keep_positive
                if result is not keep and (
                    # The opposite bool rejects; anything else must convert to `keep`.
                    result is True or result is False or self._verdict(key, result) is not keep
                ):
                    raise self._rejected(key)
            try:
                return await self.parent.query_item(key)
            except KeyError as exc:
                add_key_note(exc, key, self)
                raise
        if self.by_pairs:
            held = self._pending.pop(key)
            if held is not MISSING:
                return held
            try:
                item = await self.parent.query_item(key)
            except KeyError as exc:
                add_key_note(exc, key, self)
                raise
            if not await self._keeps(key, item):
                raise self._rejected(key)
            return item
        if key not in self._vetted and not await self._keeps(key):
            raise self._rejected(key)
        try:
            return await self.parent.query_item(key)
        except KeyError as exc:
            add_key_note(exc, key, self)
            raise

    async def query_items(self, keys: Sequence[K]) -> list[V]:
        keys = list(keys)
        if not self.by_pairs:
            if not self._vetted.contains_all(keys):
                vetted = self._vetted
                unvetted = [key for key in keys if key not in vetted]
                verdicts = await self._keeps_all(unvetted, None)
                if not all(verdicts):
                    raise self._rejected(unvetted[verdicts.index(False)])
            return await self.parent.query_items(keys)
        before = len(self._pending)
        results: list[Any] = self._pending.pop_many(keys)
        if before - len(self._pending) < len(keys):
            missing = [index for index, value in enumerate(results) if value is MISSING]
            fetch = [keys[i] for i in missing]
            items = await self.parent.query_items(fetch)
            verdicts = await self._keeps_all(fetch, items)
            for index, key, item, keep in zip(missing, fetch, items, verdicts, strict=True):
                if not keep:
                    raise self._rejected(key)
                results[index] = item
        return results
