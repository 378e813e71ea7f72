"""The ordered, bounded, concurrent fetch pipeline behind ``Dataset.batches``.

A fixed set of worker tasks claims keys in order and fetches them; finished
items wait in a reorder buffer until their batch is complete. Three bounds
keep it honest:

- at most ``concurrency`` items are being fetched at any time (an item that
  is done does not hold a slot, so one slow item does not stall the rest);
- workers do not claim keys further than ``2 * concurrency + batch_size``
  items past the first batch not yet handed out, which bounds the buffer;
- no task is created per item: the workers are created once per stream.

The stream is a plain async iterator rather than an async generator so that
leaving an ``async for`` early (which drops the last reference to it) cancels
the workers at once, without relying on generator finalisation running in
another task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from itertools import islice
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._keys import KeySequence

if TYPE_CHECKING:
    from ._dataset import Dataset

K = TypeVar("K")

#: Seconds a bulk worker may go without yielding to the event loop.
YIELD_AFTER = 0.001


def add_key_note(exc: BaseException, key: object, dataset: object) -> None:
    """Record on ``exc`` which key was being processed, once."""
    if getattr(exc, "_mlworkflow_async_key_noted", False):
        return
    with contextlib.suppress(AttributeError, TypeError):
        exc.add_note(f"while querying key {key!r} of {type(dataset).__name__}")
        exc._mlworkflow_async_key_noted = True  # type: ignore[attr-defined]


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchStream(AsyncIterator[tuple[list[K], Any]], Generic[K]):
    """Async iterator of ``(keys, batch)`` returned by ``Dataset.batches``.

    Iterate it with ``async for``. Leaving the loop early cancels the fetches
    in flight; ``await stream.aclose()`` or ``async with`` does so
    deterministically.
    """

    # The worker tasks reference only the pipeline, never this handle, so
    # dropping the handle (as leaving an ``async for`` does) runs __del__.
    __slots__ = ("_pipeline",)

    def __init__(
        self,
        dataset: Dataset[K, Any],
        batch_size: int,
        keys: AsyncIterable[K] | Iterable[K],
        collate: Callable[[list[Any]], Any],
        drop_incomplete: bool,
        concurrency: int,
    ) -> None:
        self._pipeline = _Pipeline(
            dataset, batch_size, keys, collate, drop_incomplete, concurrency
        )

    def __aiter__(self) -> BatchStream[K]:
        return self

    async def __anext__(self) -> tuple[list[K], Any]:
        return await self._pipeline.next_batch()

    async def __aenter__(self) -> BatchStream[K]:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the stream and cancel every fetch in flight."""
        await self._pipeline.aclose()

    def __del__(self) -> None:
        pipeline = getattr(self, "_pipeline", None)
        if pipeline is not None:
            pipeline.cancel()


class _Pipeline(Generic[K]):
    def __init__(
        self,
        dataset: Dataset[K, Any],
        batch_size: int,
        keys: AsyncIterable[K] | Iterable[K],
        collate: Callable[[list[Any]], Any],
        drop_incomplete: bool,
        concurrency: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._dataset = dataset
        self._batch_size = batch_size
        self._keys_source = keys
        self._collate = collate
        self._drop_incomplete = drop_incomplete
        # Backends that fetch many items in one go are given whole batches.
        self._unit = batch_size if dataset.batched_queries else 1
        self._n_workers = max(1, concurrency // self._unit)
        self._window = 2 * concurrency + batch_size
        self._keys: dict[int, K] = {}
        self._results: dict[int, Any] = {}
        # Bulk backends: each claim is a whole batch, kept whole until handed out.
        self._whole: dict[int, tuple[list[K], list[Any] | _Failure]] = {}
        self._claimed = 0  # items claimed by workers so far
        self._head = 0  # index of the first item not handed out yet
        self._head_filled = 0  # finished items in the head batch
        self._exhausted = False
        self._failed = False
        self._source_error: BaseException | None = None
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._sync_iter: Iterator[K] | None = None
        self._async_iter: AsyncIterator[K] | None = None
        self._key_seq: KeySequence[K] | None = None
        self._claim_lock: asyncio.Lock | None = None
        self._progress: asyncio.Event | None = None
        self._room: asyncio.Event | None = None

    async def aclose(self) -> None:
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def cancel(self) -> None:
        self._closed = True
        for task in self._tasks:
            with contextlib.suppress(RuntimeError):  # the loop may be closed
                task.cancel()

    async def next_batch(self) -> tuple[list[K], Any]:
        if self._closed:
            raise StopAsyncIteration
        if not self._tasks and not self._exhausted:
            self._start()
        if self._unit > 1:
            return await self._next_whole_batch()
        assert self._progress is not None
        head = self._head
        while True:
            size = self._head_size()
            if self._source_error is not None and self._claimed - head < self._batch_size:
                # Key discovery failed before this batch could be filled.
                await self.aclose()
                raise self._source_error
            if size == 0 or (size < self._batch_size and self._drop_incomplete):
                await self.aclose()
                raise StopAsyncIteration
            if self._head_filled >= size:
                break
            failure = self._first_failure(head, head + size)
            if failure is not None:
                await self.aclose()
                raise failure.exc
            self._progress.clear()
            await self._progress.wait()
        keys = [self._keys.pop(i) for i in range(head, head + size)]
        items = [self._results.pop(i) for i in range(head, head + size)]
        for item in items:
            if isinstance(item, _Failure):
                await self.aclose()
                raise item.exc
        self._head = head + size
        self._head_filled = sum(
            1 for i in range(self._head, self._head + self._batch_size) if i in self._results
        )
        self._wake_room()
        return keys, self._collate(items)

    async def _next_whole_batch(self) -> tuple[list[K], Any]:
        """The next batch when every claim is a whole batch (bulk backends)."""
        assert self._progress is not None
        head = self._head
        while True:
            done = self._whole.pop(head, None)
            if done is not None:
                break
            if self._claimed <= head and self._exhausted:
                await self.aclose()
                if self._source_error is not None:
                    raise self._source_error
                raise StopAsyncIteration
            self._progress.clear()
            await self._progress.wait()
        keys, items = done
        if isinstance(items, _Failure):
            await self.aclose()
            raise items.exc
        if len(keys) < self._batch_size and self._drop_incomplete:
            await self.aclose()
            raise StopAsyncIteration
        self._head = head + len(keys)
        self._wake_room()
        return keys, self._collate(items)

    # -- internals -------------------------------------------------------

    def _start(self) -> None:
        source = self._keys_source
        if isinstance(source, KeySequence) and source.complete:
            # Known keys are claimed without awaiting anything: the fast path.
            self._sync_iter = iter(source.known)
        elif isinstance(source, KeySequence):
            # Claimed by position, a whole unit per await rather than key by key.
            self._key_seq = source
        elif isinstance(source, AsyncIterable):
            self._async_iter = aiter(source)
        else:
            self._sync_iter = iter(source)
        self._claim_lock = asyncio.Lock()
        self._progress = asyncio.Event()
        self._room = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work()) for _ in range(self._n_workers)]

    def _head_size(self) -> int:
        if self._exhausted:
            return max(0, min(self._batch_size, self._claimed - self._head))
        return self._batch_size

    def _first_failure(self, start: int, stop: int) -> _Failure | None:
        if not self._failed:
            return None
        for i in range(start, stop):
            result = self._results.get(i)
            if isinstance(result, _Failure):
                return result
        return None

    def _wake_room(self) -> None:
        room = self._room
        assert room is not None
        self._room = asyncio.Event()
        room.set()

    def _wake_consumer(self) -> None:
        assert self._progress is not None
        self._progress.set()

    def _room_to_claim(self) -> bool:
        return self._claimed + self._unit <= self._head + self._window

    def _register(self, keys: list[K]) -> tuple[int, list[K]]:
        start = self._claimed
        if self._unit == 1:
            for offset, key in enumerate(keys):
                self._keys[start + offset] = key
        self._claimed = start + len(keys)
        if self._exhausted:
            self._wake_consumer()
        return start, keys

    def _take_now(self, iterator: Iterator[K]) -> tuple[int, list[K]]:
        keys = list(islice(iterator, self._unit))
        if len(keys) < self._unit:
            self._exhausted = True
        return self._register(keys)

    async def _claim(self) -> tuple[int, list[K]]:
        """Take the next unit of keys, waiting for room in the window."""
        lock = self._claim_lock
        assert lock is not None
        sync_iter = self._sync_iter
        if sync_iter is not None and not lock.locked() and self._room_to_claim():
            # Nothing is awaited from here on, so no other worker can interleave.
            return self._take_now(sync_iter)
        async with lock:
            while not self._room_to_claim():
                assert self._room is not None
                await self._room.wait()
            if self._exhausted:
                return self._claimed, []
            if sync_iter is not None:
                return self._take_now(sync_iter)
            if self._key_seq is not None:
                start = self._claimed
                claimed = await self._key_seq.slice(start, start + self._unit)
                if len(claimed) < self._unit:
                    self._exhausted = True
                return self._register(claimed)
            assert self._async_iter is not None
            keys: list[K] = []
            for _ in range(self._unit):
                try:
                    keys.append(await anext(self._async_iter))
                except StopAsyncIteration:
                    self._exhausted = True
                    break
            return self._register(keys)

    async def _work(self) -> None:
        if self._unit == 1:
            await self._work_items()
        else:
            await self._work_units()

    async def _work_items(self) -> None:
        """One key at a time: the hot loop of I/O-bound streams, kept lean."""
        query_item = self._dataset.query_item
        keys, results = self._keys, self._results
        lock = self._claim_lock
        assert lock is not None
        while not (self._exhausted or self._failed or self._closed):
            sync_iter = self._sync_iter
            if (
                sync_iter is not None
                and not lock.locked()
                and self._claimed < self._head + self._window
            ):
                try:
                    key = next(sync_iter)
                except StopIteration:
                    self._exhausted = True
                    self._wake_consumer()
                    return
                index = self._claimed
                self._claimed = index + 1
                keys[index] = key
            else:
                try:
                    index, claimed = await self._claim()
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    self._fail_source(exc)
                    return
                if not claimed:
                    return
                key = claimed[0]
            try:
                result = await query_item(key)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                add_key_note(exc, key, self._dataset)
                self._record(index, [_Failure(exc)], failed=True)
                return
            results[index] = result
            head = self._head
            if head <= index < head + self._batch_size:
                self._head_filled += 1
                if self._head_filled >= self._head_size():
                    self._wake_consumer()

    def _fail_source(self, exc: BaseException) -> None:
        self._source_error = exc
        self._exhausted = self._failed = True
        self._wake_consumer()

    async def _work_units(self) -> None:
        dataset = self._dataset
        clock = asyncio.get_running_loop().time
        last_yield = clock()
        while not (self._exhausted or self._failed or self._closed):
            try:
                start, keys = await self._claim()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the key source itself failed
                self._fail_source(exc)
                return
            if not keys:
                return
            try:
                results = list(await dataset.query_items(keys))
                if len(results) != len(keys):
                    raise RuntimeError(
                        f"{type(dataset).__name__}.query_items returned {len(results)} "
                        f"items for {len(keys)} keys"
                    )
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self._failed = True
                self._whole[start] = (keys, _Failure(exc))
                self._wake_consumer()
                return
            self._whole[start] = (keys, results)
            if start == self._head:
                self._wake_consumer()
            # A bulk read served from memory or the page cache may finish
            # without suspending: yield once YIELD_AFTER has passed, so the
            # loop keeps turning, without paying a task switch per batch.
            now = clock()
            if now - last_yield >= YIELD_AFTER:
                last_yield = now
                await asyncio.sleep(0)

    def _record(self, start: int, results: list[Any], failed: bool) -> None:
        head, stop = self._head, self._head + self._batch_size
        self._failed = self._failed or failed
        in_head = 0
        for offset, result in enumerate(results):
            index = start + offset
            self._results[index] = result
            if head <= index < stop:
                in_head += 1
        if in_head:
            self._head_filled += in_head
            if failed or self._head_filled >= self._head_size():
                self._wake_consumer()
        elif failed:
            self._wake_consumer()
