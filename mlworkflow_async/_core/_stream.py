"""The stream of batches that ``Dataset.batches()`` returns: iterate, checkpoint, resume."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._collate import Collate, collate_batch, name_batch
from ._engine import Engine, Failure, KeyReader, OnError, StreamStats, current_reader
from ._keys import KeySequence
from ._order import KnownOrder, StreamedOrder, StreamSpec

if TYPE_CHECKING:
    from ._dataset import Dataset

__all__ = ["BatchStream"]

K = TypeVar("K")


class BatchStream(AsyncIterator[tuple[list[K], Any]], Generic[K]):
    """Async iterator of ``(keys, batch)`` pairs, returned by :meth:`Dataset.batches`.

    Iterate it with ``async for``. Leaving the loop early cancels the fetches
    in flight; ``await stream.aclose()`` or ``async with`` does so at once.

    :meth:`state_dict` records where the stream is, at any point, as a small
    JSON-serialisable dict; ``dataset.batches(..., resume=state)`` continues
    from there with exactly the batches not handed out yet.

    >>> import asyncio
    >>> from mlworkflow_async import DictDataset
    >>> ds = DictDataset({i: i for i in range(10)})
    >>> async def main():
    ...     stream = ds.batches(4, shuffle=1)
    ...     first = await anext(stream)
    ...     state = stream.state_dict()
    ...     await stream.aclose()
    ...     rest = [keys async for keys, _ in ds.batches(4, shuffle=1, resume=state)]
    ...     return sorted(first[0] + sum(rest, []))
    >>> asyncio.run(main())
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """

    # The workers reference the engine, never this handle, so dropping the
    # handle (as leaving an ``async for`` does) runs __del__ and cancels them.
    __slots__ = (
        "_bar",
        "_busy",
        "_collate",
        "_concurrency",
        "_dataset",
        "_engine",
        "_failures",
        "_keys",
        "_max_failures",
        "_on_error",
        "_order",
        "_progress",
        "_resume",
        "_spec",
        "_stats",
    )

    def __init__(
        self,
        dataset: Dataset[K, Any],
        keys: AsyncIterable[K] | Iterable[K],
        collate: Collate,
        spec: StreamSpec,
        concurrency: int,
        on_error: OnError,
        max_failures: float | None,
        resume: dict[str, Any] | None,
        progress: bool,
    ) -> None:
        self._dataset = dataset
        self._keys = keys
        self._collate = collate
        self._spec = spec
        self._concurrency = concurrency
        self._on_error = on_error
        self._max_failures = max_failures
        self._resume = resume
        self._progress = progress
        self._engine: Engine[K] | None = None
        self._order: KnownOrder[K] | StreamedOrder[K] | None = None
        self._stats = StreamStats()
        self._failures: list[Failure[K]] = []
        self._bar: Any = None
        self._busy = False  # a task is inside __anext__
        if resume is not None:
            spec.check(resume)  # wrong arguments fail here, before anything runs

    # -- iteration ---------------------------------------------------------

    def __aiter__(self) -> BatchStream[K]:
        return self

    async def __anext__(self) -> tuple[list[K], Any]:
        if self._busy:
            # The engine serves one consumer; a second one waiting with it
            # would steal its wake-up (and a second _prepare, make a second engine).
            raise RuntimeError(
                f"anext(): {self!r} is already running: another task is waiting for its "
                f"next batch. A stream hands each batch to one consumer: iterate it from "
                f"one task (and pass batches on, e.g. through a memory object stream), or "
                f"take turns with a lock (`async with lock: await anext(stream)`)"
            )
        self._busy = True
        try:
            engine = self._engine
            if engine is None:
                engine = await self._prepare()
            unit = await engine.next_unit()
        except BaseException:
            self._close_bar()
            raise
        finally:
            self._busy = False
        keys = unit.kept_keys()
        bar = self._bar
        if bar is not None:
            bar.set_postfix_str(f"{self._stats.batches} batches", refresh=False)
            bar.update(len(keys))
        return keys, unit.batch

    async def _prepare(self) -> Engine[K]:
        # Keys discovered here (all of them, to shuffle) are read for this
        # stream, as its workers read the others: within its bound on
        # fetches, skipping failures if it does.
        early: list[Failure[Any]] = []
        reading = current_reader.set(KeyReader(
            self._concurrency,
            (lambda key, exc: early.append(Failure(key, exc)))
            if self._on_error == "skip" else None,
        ))
        try:
            order, start, done = await self._order_keys()
        finally:
            current_reader.reset(reading)
        engine = self._engine = self._new_engine(order, start, done)
        for failure in early:
            engine.skip_key(failure.key, failure.exception)
        return engine

    async def _order_keys(
        self,
    ) -> tuple[KnownOrder[K] | StreamedOrder[K], int, frozenset[int]]:
        """The order of the stream's keys, and where it starts (resuming)."""
        spec = self._spec
        dataset = self._dataset
        source = self._keys
        order: KnownOrder[K] | StreamedOrder[K]
        known: Sequence[K] | None = None
        if isinstance(source, KeySequence):
            if spec.shuffle is not None or spec.shard is not None or source.complete:
                # Shuffling and sharding need every key: wait for them.
                known = await source.sequence()
        elif isinstance(source, Sequence):
            known = source
        elif spec.shuffle is not None or spec.shard is not None:
            known = [key async for key in source] if isinstance(source, AsyncIterable) else list(
                source
            )
        if known is not None:
            shard = spec.shard
            local = _whole_files(dataset, source, known, shard)
            if local is not None:  # this rank's whole files: its keys, in its own order
                known, shard = local, None
            order = KnownOrder(
                known, spec.batch_size, spec.shuffle, spec.epoch, shard, spec.drop_incomplete,
            )
        else:
            order = StreamedOrder(source, spec.batch_size)
            if isinstance(source, KeySequence):
                source.claim(order, spec.batch_size)
        start, done = 0, frozenset[int]()
        if self._resume is not None:
            start, done = spec.check(self._resume)
            if isinstance(order, KnownOrder):
                order.check_keys(self._resume["keys"], start * spec.batch_size)
            else:
                await order.check_keys(self._resume["keys"])
        self._order = order
        return order, start, done

    def _new_engine(
        self, order: KnownOrder[K] | StreamedOrder[K], start: int, done: frozenset[int]
    ) -> Engine[K]:
        from ._dataset import bounded_batch  # the module that imports this one

        spec = self._spec
        dataset = self._dataset
        bulk = dataset.batched_queries
        collate = self._collate
        # Each batch's fetches stay within the stream's bound: with
        # concurrency // batch_size batches in flight (one at least), the
        # stream's concurrency per batch bounds them all.
        fetch_unit = bounded_batch(dataset, collate, self._concurrency)

        async def finish(keys: list[K], items: list[Any]) -> Any:
            try:
                return await collate_batch(items, collate)
            except Exception as exc:
                name_batch(exc, keys)
                raise

        engine = Engine(
            order,
            owner=dataset,
            concurrency=self._concurrency,
            fetch_item=dataset.query_item,
            fetch_unit=fetch_unit if bulk else None,
            finish=finish,
            ordered=spec.ordered,
            on_error=self._on_error,
            max_failures=self._max_failures,
            start=start,
            done=done,
            drop_incomplete=spec.drop_incomplete,
            stats=self._stats,
        )
        self._failures = engine.failures
        if self._progress:
            self._bar = _progress_bar(order, start, len(done))
        return engine

    # -- state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: pass it as ``batches(..., resume=state)`` to continue.

        Small and JSON-serialisable: its size is constant for an ordered
        stream and grows at most with ``concurrency`` in completion order.
        """
        return self._state_at(self._where())

    def _where(self) -> tuple[int, tuple[int, ...]] | None:
        """Where the stream is, cheaply: the position and units done beyond it (None
        before it starts); :meth:`_state_at` turns it into a :meth:`state_dict` later."""
        engine = self._engine
        if engine is None or self._order is None:
            return None
        return engine.position, tuple(engine.done_beyond)

    def _state_at(self, where: tuple[int, tuple[int, ...]] | None) -> dict[str, Any]:
        """The :meth:`state_dict` of the stream when :meth:`_where` returned ``where``."""
        order = self._order
        if where is None or order is None:
            if self._resume is not None:
                return dict(self._resume)
            return self._spec.state(0, (), None)
        position, done = where
        if isinstance(order, KnownOrder):
            keys = order.fingerprint()
        else:
            keys = order.fingerprint(position * self._spec.batch_size)
        return self._spec.state(position, done, keys)

    @property
    def failures(self) -> list[Failure[K]]:
        """The items left out with ``on_error="skip"``: each a ``Failure(key, exception)``."""
        return self._failures

    @property
    def stats(self) -> StreamStats:
        """Counts of the stream so far (items fetched, failed, in flight, waits, rate)."""
        return self._stats

    # -- closing -------------------------------------------------------------

    async def __aenter__(self) -> BatchStream[K]:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the stream and cancel every fetch in flight."""
        self._close_bar()
        if self._engine is not None:
            await self._engine.aclose()

    def _close_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.cancel()

    def __repr__(self) -> str:
        spec = self._spec
        state = "not started" if self._engine is None else f"at batch {self._engine.position}"
        return (
            f"<mlworkflow_async.BatchStream of {type(self._dataset).__name__}, "
            f"batch_size={spec.batch_size}, {state}>"
        )


def _whole_files(
    dataset: object, source: object, keys: Sequence[K], shard: tuple[int, int] | None
) -> list[K] | None:
    """The keys of the files rank ``shard[0]`` reads whole, when files split evenly.

    A dataset stored in several files says where each begins
    (``shard_groups()``); when dealing the files out in turn gives every rank
    the same number of keys, each rank reads whole files (locality), and the
    guarantees of the key-level split hold (disjoint, complete, equal counts).
    """
    groups = getattr(dataset, "shard_groups", None)
    if shard is None or groups is None or source is not getattr(dataset, "keys", None):
        return None
    rank, world = shard
    found = list(groups())
    mine = found[rank::world]
    totals = {sum(count for _, count in found[r::world]) for r in range(world)}
    if world == 1 or len(found) < world or len(totals) != 1:
        return None
    return [key for start, count in mine for key in keys[start:start + count]]


def _progress_bar(order: KnownOrder[Any] | StreamedOrder[Any], start: int, done: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn(
            "batches(progress=True) shows a progress bar with tqdm, which is not installed: "
            "pip install 'mlworkflow-async[tqdm]'",
            stacklevel=4,
        )
        return None
    total = order.count if isinstance(order, KnownOrder) else None
    initial = min(total or 0, (start + done) * order.batch_size) if total else 0
    return tqdm(total=total, initial=initial, unit="item", desc="batches")
