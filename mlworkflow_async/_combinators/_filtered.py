"""A dataset keeping the items of another that pass a predicate."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from itertools import compress, islice
from operator import not_
from types import CoroutineType
from typing import Any, TypeVar

import numpy as np

from .._core._callables import describe, is_async_callable, positional_arity
from .._core._dataset import Dataset
from .._core._engine import add_key_note, map_ordered, reader_concurrency
from .._core._executors import worker_pool
from .._core._keys import KeySequence
from ..exceptions import UnhashableKeyError
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
# Accepted keys held for the queries that follow, even with no reader: keys are light.
_VETTED_KEPT = 1 << 16


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
    ([2, 4], ['a', 'c'])

    Keys are discovered lazily, so ``len()`` works once they all are. The
    keys accepted while discovering them are remembered. The items a pair
    predicate fetched to judge them are held until queried once, but only
    while a reader (a batch stream, ``async for``, the blocking view) is
    claiming keys, and only as far as it may still claim: twice the keys it
    claims at once, plus the step of discovery in progress. Each step judges
    at most ``buffer_size // 2`` parent items (the knob: less memory per
    step against fewer steps); ``buffer_size=0`` holds none. So iterating
    keys then querying them judges each key and fetches each item once,
    while ``await ds.keys.all()`` alone holds no item at all.

    ``executor`` runs the predicate elsewhere, a batch per hop: ``"thread"``,
    ``"process"`` (a pool of ``workers``), any ``concurrent.futures.Executor``
    or a ``dask.distributed.Client``, as for
    :class:`~mlworkflow_async.TransformedDataset`.
    """

    parent: Dataset[K, V]
    batched_queries = True

    def __init__(
        self,
        parent: Dataset[K, V],
        predicate: Callable[..., bool | Awaitable[bool]],
        keep_positive: bool = True,
        *,
        buffer_size: int = 256,
        executor: Any = None,
        workers: int | None = None,
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
        self._pool = worker_pool(executor, workers)
        self.predicate = predicate
        self.keep_positive = bool(keep_positive)
        #: True when the predicate judges ``(key, item)`` pairs, False for keys only.
        self.by_pairs = arity == 2
        self.buffer_size = buffer_size
        self._async = is_async_callable(predicate)
        # Items fetched to judge pairs, until their first query.
        self._pending: Discovered[K, V] = Discovered()
        # Keys accepted by key discovery, the latest ones: not judged again.
        self._vetted: dict[K, None] = {}

    # -- judging ---------------------------------------------------------

    def _verdict(self, key: K, result: object) -> bool:
        """``result`` as a bool, or a clear error."""
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
            f"explicitly, e.g. `lambda k: bool(...)`, if truthiness is really meant"
        )

    def _note(self, exc: BaseException, key: K) -> None:
        exc.add_note(f"raised by predicate {describe(self.predicate)}")
        add_key_note(exc, key, self)

    async def _judge(self, keys: Sequence[K], items: Sequence[V] | None) -> list[bool]:
        """Keep or not, for a batch of keys (and their items, for a pair predicate)."""
        if self._pool is None and not self._async:
            return self._judge_plain(keys, items)
        columns: tuple[Sequence[Any], ...] = (keys,) if items is None else (keys, items)
        results: list[Any] = []
        if self._pool is not None and not (self._async and self._pool.in_threads):

            def noted(exc: BaseException, index: int) -> None:
                self._note(exc, keys[index])

            results = await self._pool.run_batch(
                self.predicate, list(zip(*columns, strict=True)), keys=keys, on_error=noted
            )
        else:

            async def one(index: int) -> Any:
                try:
                    predicate: Any = self.predicate
                    return await predicate(*(column[index] for column in columns))
                except Exception as exc:
                    self._note(exc, keys[index])
                    raise

            results = await map_ordered(one, range(len(keys)), len(keys), self)
        return self._verdicts(keys, results)

    def _judge_plain(self, keys: Sequence[K], items: Sequence[V] | None) -> list[bool]:
        """:meth:`_judge` by a plain predicate, on the calling thread."""
        columns: tuple[Sequence[Any], ...] = (keys,) if items is None else (keys, items)
        results: list[Any] = []
        try:
            # One C-level pass; extend() keeps what came before a failure.
            results.extend(map(self.predicate, *columns))
        except Exception as exc:
            self._note(exc, keys[len(results)])
            raise
        return self._verdicts(keys, results)

    def _verdicts(self, keys: Sequence[K], results: list[Any]) -> list[bool]:
        """The predicate's results as kept or not, each checked to be a bool."""
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

    def _unvetted(self, keys: list[K]) -> list[K]:
        """The keys that key discovery has not accepted lately: those to judge."""
        vetted = self._vetted
        try:
            if all(map(vetted.__contains__, keys)):
                return []
        except TypeError:
            UnhashableKeyError.check(self, keys)
            raise
        return [key for key in keys if key not in vetted]

    def _refuse_rejected(self, keys: list[K], verdicts: list[bool]) -> None:
        if not all(verdicts):
            raise self._rejected(keys[verdicts.index(False)])

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
            # Items judged are held until queried: a step stays within the buffer.
            return DerivedKeyChunks(
                self.parent.keys, self._vet_pairs, _FIRST_CHUNK, self.buffer_size // 2
            )
        return DerivedKeyChunks(self.parent.keys, self._vet_keys, _FIRST_CHUNK, _KEY_CHUNK)

    def yield_keys(self) -> Any:
        return flatten_chunks(self._key_chunks())

    async def _vet_keys(self, keys: Sequence[K]) -> list[K]:
        kept = list(compress(keys, await self._judge(keys, None)))
        vetted = self._vetted
        vetted.update(dict.fromkeys(kept))
        if len(vetted) > _VETTED_KEPT:  # forget the oldest quarter, in one C-level pass
            deque(map(vetted.pop, list(islice(vetted, _VETTED_KEPT // 4))), maxlen=0)
        return kept

    async def _vet_pairs(self, keys: Sequence[K]) -> list[K]:
        # Within the bound of the stream discovering the keys, if one is.
        items = await self._parent_items(list(keys), reader_concurrency())
        verdicts = await self._judge(keys, items)
        kept = list(compress(keys, verdicts))
        if self.buffer_size:
            self._pending.add(
                dict(zip(kept, compress(items, verdicts), strict=True)), self.keys.reach
            )
        return kept

    # -- items -----------------------------------------------------------

    async def query_items(
        self, keys: Sequence[K], concurrency: int | None = None
    ) -> list[V]:
        keys = list(keys)
        if not self.by_pairs:
            unvetted = self._unvetted(keys)
            if unvetted:
                self._refuse_rejected(unvetted, await self._judge(unvetted, None))
            return await self._from_parent(keys, concurrency)
        pending = self._pending
        before = len(pending)
        try:
            results: list[Any] = pending.pop_many(keys)
        except TypeError:
            UnhashableKeyError.check(self, keys)
            raise
        if before - len(pending) < len(keys):
            missing = [index for index, value in enumerate(results) if value is MISSING]
            fetch = [keys[i] for i in missing]
            items = await self._from_parent(fetch, concurrency)
            verdicts = await self._judge(fetch, items)
            for index, key, item, keep in zip(missing, fetch, items, verdicts, strict=True):
                if not keep:
                    raise self._rejected(key)
                results[index] = item
        return results

    def _blocking_items(self, keys: Sequence[K]) -> list[V] | None:
        # A plain key predicate over a parent read on the calling thread: judged
        # there too (keys vetted by discovery are not judged again).
        if self.by_pairs or self._async or self._pool is not None:
            return None
        keys = list(keys)
        unvetted = self._unvetted(keys)
        if unvetted:
            self._refuse_rejected(unvetted, self._judge_plain(unvetted, None))
        try:
            return self.parent._blocking_items(keys)
        except KeyError as exc:
            self._note_missing(exc, keys)
            raise

    async def _from_parent(self, keys: list[K], concurrency: int | None) -> list[V]:
        try:
            return await self._parent_items(keys, concurrency)
        except KeyError as exc:
            self._note_missing(exc, keys)
            raise
        except TypeError:
            UnhashableKeyError.check(self, keys)
            raise

    def _note_missing(self, exc: KeyError, keys: list[K]) -> None:
        if len(keys) == 1:
            add_key_note(exc, keys[0], self)
