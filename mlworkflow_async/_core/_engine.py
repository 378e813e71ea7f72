"""The one engine behind every concurrent fetch of the library.

``batches()``, ``query_items()``, ``query()``, ``CachedDataset.fill()``,
``PickledDataset.create()`` and the combinators' fetches of their parents
all run on :class:`Engine`. It hands out *units* (batches) of keys that an
order (:mod:`._order`) defines, fetched by a fixed set of worker tasks:

- a *per-item* engine fetches keys one by one (``query_item``); at most
  ``concurrency`` fetches are in flight, and a finished item holds no slot,
  so one slow item never stalls the rest;
- a *bulk* engine fetches a whole unit per call (``query_items`` or
  ``query_batch`` of a backend with ``batched_queries``), with
  ``concurrency // batch_size`` units in flight.

Workers claim positions in order and never further than
``2 * concurrency + batch_size`` items past the first unit not handed out
(in completion order: past the items handed out, and at most ``SPAN``
such windows past the first unit not handed out), which bounds what waits
in memory and what a saved state holds. Units are handed out in order
(``ordered=True``) or as they complete. On a failure the engine either
stops (``on_error="raise"``: every unit before the failing one is still
handed out, then its exception, with a note naming the key) or leaves the
item out of its unit and records it (``on_error="skip"``); a unit whose items
all failed is dropped, its place counted as handed out.

Workers are tasks of their own rather than children of a task group, so
that a plain ``async for`` over a stream can stop at any point and drop it:
dropping cancels them. Under trio they are system tasks, cancelled through
their cancel scopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.lowlevel

from ..exceptions import TooManyFailuresError
from ._order import KnownOrder, StreamedOrder
from ._portal import EventLike, new_event, running_loop_library

__all__ = [
    "Engine",
    "Failure",
    "KeyReader",
    "StreamStats",
    "add_key_note",
    "current_reader",
    "map_ordered",
    "reader_concurrency",
]

K = TypeVar("K")
A = TypeVar("A")
R = TypeVar("R")

#: Seconds a bulk worker may go without yielding to the event loop.
YIELD_AFTER = 0.001

OnError = Literal["raise", "skip"]

#: In completion order, how many windows past a unit still in flight
#: workers may claim: a slow item holds back nothing until then.
SPAN = 8

#: The statistics of the stream whose worker is running, for layers that
#: count on its behalf (retries).
current_stats: contextvars.ContextVar[StreamStats | None] = contextvars.ContextVar(
    "mlworkflow_async_stream_stats", default=None
)


@dataclass(frozen=True)
class KeyReader:
    """The stream for which keys are being discovered, and what discovery follows there.

    ``concurrency`` bounds the parent items that discovery fetches (a pair
    predicate's, an augmented root's); ``skip``, when the stream skips
    failures, records a parent key whose discovery failed, which is then
    left out instead of raising.
    """

    concurrency: int
    skip: Callable[[Any, Exception], None] | None = None


#: The stream whose worker (or whose preparation) is discovering keys now.
current_reader: contextvars.ContextVar[KeyReader | None] = contextvars.ContextVar(
    "mlworkflow_async_key_reader", default=None
)


def reader_concurrency() -> int | None:
    """The bound on fetches of the stream discovering keys now; None outside one."""
    reader = current_reader.get()
    return None if reader is None else reader.concurrency


def add_key_note(exc: BaseException, key: object, dataset: object) -> None:
    """Record on ``exc`` which key was being processed, once."""
    if getattr(exc, "_mlworkflow_async_key_noted", False):
        return
    with contextlib.suppress(AttributeError, TypeError):
        exc.add_note(f"while querying key {key!r} of {type(dataset).__name__}")
        exc._mlworkflow_async_key_noted = True  # type: ignore[attr-defined]


@dataclass
class Failure(Generic[K]):
    """An item left out of its batch by ``on_error="skip"``: its key and what it raised.

    For a key whose discovery failed, ``key`` is the parent's key that a
    predicate or ``augment()`` raised for.
    """

    key: K
    exception: BaseException


@dataclass
class StreamStats:
    """Counts to tune a stream with; read them at any time from ``stream.stats``.

    ``head_wait`` is the time the consumer spent waiting for the next batch
    in order (high: fetching is the bottleneck; raise ``concurrency``).
    """

    fetched: int = 0
    failed: int = 0
    retried: int = 0
    in_flight: int = 0
    batches: int = 0
    items: int = 0
    head_wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def items_per_second(self) -> float:
        """Items handed out per second since the stream started."""
        elapsed = time.perf_counter() - self.started
        return self.items / elapsed if elapsed > 0 else 0.0

    def __repr__(self) -> str:
        return (
            f"StreamStats(fetched={self.fetched}, failed={self.failed}, "
            f"retried={self.retried}, in_flight={self.in_flight}, batches={self.batches}, "
            f"items={self.items}, head_wait={self.head_wait:.3f}s, "
            f"items_per_second={self.items_per_second:.1f})"
        )


class Unit(Generic[K]):
    """One unit (batch) of the stream: its keys, then its items or its batch."""

    __slots__ = ("batch", "index", "items", "keys", "left_out", "missing", "ready")

    def __init__(self, index: int, keys: list[K]) -> None:
        self.index = index
        self.keys = keys
        self.items: list[Any] = [None] * len(keys)
        self.missing = len(keys)
        self.left_out: list[int] = []  # positions skipped after a failure
        self.batch: Any = None
        self.ready = False

    def kept_keys(self) -> list[K]:
        if not self.left_out:
            return self.keys
        gone = set(self.left_out)
        return [key for i, key in enumerate(self.keys) if i not in gone]

    def kept_items(self) -> list[Any]:
        if not self.left_out:
            return self.items
        gone = set(self.left_out)
        return [item for i, item in enumerate(self.items) if i not in gone]


#: Turns a unit's keys and items (those kept) into its batch.
Finish = Callable[[list[Any], list[Any]], Awaitable[Any]]


async def _as_list(keys: list[Any], items: list[Any]) -> list[Any]:
    return items


class Engine(Generic[K]):
    """Fetch the units of ``order`` concurrently; :meth:`next_unit` hands them out.

    Exactly one of the modes applies: ``fetch_unit`` (bulk) or ``fetch_item``
    (per item, then ``finish`` turns a unit's items into its batch). A bulk
    engine given ``fetch_item`` and ``finish`` too salvages a failed unit
    item by item when skipping failures.
    """

    def __init__(
        self,
        order: KnownOrder[K] | StreamedOrder[K],
        *,
        owner: object,
        concurrency: int,
        fetch_item: Callable[[K], Awaitable[Any]] | None = None,
        fetch_unit: Callable[[list[K]], Awaitable[Any]] | None = None,
        finish: Finish = _as_list,
        ordered: bool = True,
        on_error: OnError = "raise",
        max_failures: float | None = None,
        start: int = 0,
        done: frozenset[int] = frozenset(),
        drop_incomplete: bool = False,
        stats: StreamStats | None = None,
    ) -> None:
        self._order = order
        self._known = isinstance(order, KnownOrder)
        self._owner = owner
        self._fetch_item = fetch_item
        self._fetch_unit = fetch_unit
        self._finish = finish
        self._ordered = ordered
        self._skip = on_error == "skip"
        self._max_failures = max_failures
        self._drop_incomplete = drop_incomplete
        self.stats = stats if stats is not None else StreamStats()
        # Only a stream's engine counts retries and is the reader of the keys
        # it discovers; an inner one (a combinator fetching its parent)
        # leaves both to the stream it works for.
        self._counts_retries = stats is not None
        self._reader = (
            KeyReader(concurrency, self.skip_key if self._skip else None)
            if stats is not None else None
        )
        self.failures: list[Failure[K]] = []
        size = order.batch_size
        self._size = size
        self._bulk = fetch_unit is not None
        if self._bulk:
            self._n_workers = max(1, concurrency // size)
        else:
            self._n_workers = concurrency
            if isinstance(order, KnownOrder):
                self._n_workers = max(1, min(concurrency, order.count))
        self._window = 2 * concurrency + size
        self._units: dict[int, Unit[K]] = {}
        self._resumed_done = done
        self._done = set(done)  # units handed out beyond the head
        self._head = self._skip_done(start)  # the first unit not handed out
        self._next = self._head  # the next unit to claim
        self._room_end = 0  # the first position workers may not claim yet
        self._update_room()
        self._filling: Unit[K] | None = None  # per item: the unit being claimed
        self._filled = 0  # its keys claimed so far
        self._end: int | None = order.units if isinstance(order, KnownOrder) else None
        self._error: tuple[int, BaseException] | None = None
        self._stopping = False
        self._closed = False
        self._started = False
        self._tasks: list[Any] = []
        self._scopes: list[anyio.CancelScope] = []
        self._running = 0
        self._cancelled: type[BaseException] = asyncio.CancelledError
        # Made by _start(), inside the event loop that runs the stream.
        # Made only when someone waits: events are the cost of a wait, not of a unit.
        self._progress: EventLike | None = None
        # Workers waiting for room, woken one at a time (see _wait_for_room).
        self._room_waiters: deque[EventLike] = deque()
        self._all_ended: EventLike

    # -- the consumer side -------------------------------------------------

    @property
    def position(self) -> int:
        """Units handed out before which every unit is handed out."""
        return self._head

    @property
    def done_beyond(self) -> set[int]:
        """Units handed out past :attr:`position` (completion order only)."""
        return self._done

    async def next_unit(self) -> Unit[K]:
        """The next unit, in order or as completed; ``StopAsyncIteration`` at the end."""
        if self._closed:
            raise StopAsyncIteration
        if not self._started:
            self._start()
        waited_from: float | None = None
        while True:
            unit = self._ready_unit()
            if unit is not None:
                if not self._hand_out(unit):
                    continue  # every item failed: nothing to hand out
                if waited_from is not None:
                    self.stats.head_wait += time.perf_counter() - waited_from
                return unit
            error = self._error
            if error is not None and (not self._ordered or error[0] <= self._head):
                await self.aclose()
                raise error[1]
            if self._end is not None and self._head >= self._end:
                await self.aclose()
                if self._too_many_failures(final=True):
                    raise self._error[1]  # type: ignore[index]
                raise StopAsyncIteration
            if waited_from is None:
                waited_from = time.perf_counter()
            progress = self._progress = new_event()
            await progress.wait()
            self._progress = None

    def take_ready(self) -> list[Unit[K]]:
        """The units that :meth:`next_unit` would hand out now without waiting, in order.

        A consumer with a per-call cost (a thread hop per write) takes them
        together with the one it awaited.
        """
        taken = []
        while not self._closed and (unit := self._ready_unit()) is not None:
            if self._hand_out(unit):
                taken.append(unit)
        return taken

    def hold(self, items: int) -> None:
        """Let workers claim up to ``items`` past the head, if more than they may now.

        The number of fetches in flight stays as it is: only what waits for
        the consumer grows. A consumer that learns its items are small (a
        writer, after its first chunks) lets more of them gather per call.
        """
        if items > self._window:
            self._window = items
            self._update_room()
            if self._room_waiters:
                self._room_waiters.popleft().set()  # it passes the room on

    def _ready_unit(self) -> Unit[K] | None:
        if self._ordered:
            unit = self._units.get(self._head)
            return unit if unit is not None and unit.ready else None
        for unit in self._units.values():
            if unit.ready:
                return unit
        return None

    def _hand_out(self, unit: Unit[K]) -> bool:
        """Take ``unit`` off the stream; False when it is empty, to drop (its
        place counts as handed out, so that a saved state skips it)."""
        index = unit.index
        del self._units[index]
        if index == self._head:
            self._head = self._skip_done(index + 1)
        else:
            self._done.add(index)
        self._update_room()
        if self._room_waiters:
            self._room_waiters.popleft().set()
        kept = len(unit.keys) - len(unit.left_out)
        if not kept:
            return False
        stats = self.stats
        stats.batches += 1
        stats.items += kept
        return True

    def _skip_done(self, index: int) -> int:
        done = self._done
        while index in done:
            done.discard(index)
            index += 1
        return index

    async def aclose(self) -> None:
        """Cancel every fetch in flight and wait for the workers to end."""
        self.cancel()
        tasks, self._tasks = self._tasks, []
        if tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)
        elif self._running:
            with anyio.CancelScope(shield=True):
                await self._all_ended.wait()

    def cancel(self) -> None:
        """Cancel the workers without waiting (safe from ``__del__``)."""
        self._closed = self._stopping = True
        self._wake_all_waiters()
        for task in self._tasks:
            with contextlib.suppress(RuntimeError):  # the loop may be closed
                task.cancel()
        for scope in self._scopes:
            scope.cancel()

    # -- the workers -------------------------------------------------------

    def _start(self) -> None:
        self._started = True
        self._keys_pending: EventLike | None = None
        library = running_loop_library()
        if library is None:
            raise RuntimeError("mlworkflow_async streams must be iterated inside an event loop")
        self._cancelled = anyio.get_cancelled_exc_class()
        work = self._unit_worker if self._bulk else self._item_worker
        if library == "asyncio":
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._guard(work)) for _ in range(self._n_workers)]
        else:
            import trio

            self._all_ended = new_event()
            self._running = self._n_workers
            for _ in range(self._n_workers):
                # A system task starts in an empty context; the caller's
                # contextvars (the stream's stats, the user's own) carry over
                # as asyncio's create_task carries them.
                trio.lowlevel.spawn_system_task(
                    self._scoped, work, context=contextvars.copy_context()
                )

    async def _scoped(self, work: Callable[[], Awaitable[None]]) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._scopes.append(scope)
                if not self._closed:
                    await self._guard(work)
        finally:
            self._running -= 1
            if not self._running:
                self._all_ended.set()

    async def _guard(self, work: Callable[[], Awaitable[None]]) -> None:
        token = current_stats.set(self.stats) if self._counts_retries else None
        reading = current_reader.set(self._reader) if self._reader is not None else None
        try:
            await work()
        except self._cancelled:
            raise
        except BaseException as exc:  # a failure of the engine or of a key source
            self._fail(self._next, exc)
        finally:
            if token is not None:
                current_stats.reset(token)
            if reading is not None:
                current_reader.reset(reading)

    def _fail(self, unit: int, exc: BaseException) -> None:
        if self._error is None or unit < self._error[0]:
            self._error = (unit, exc)
        self._stopping = True
        self._wake_all_waiters()
        self._tell_consumer()

    def _wake(self, unit: Unit[K]) -> None:
        unit.ready = True
        if not self._ordered or unit.index == self._head:
            self._tell_consumer()

    def _tell_consumer(self) -> None:
        progress = self._progress
        if progress is not None:
            progress.set()

    async def _wait_for_room(self) -> None:
        """Wait until a unit is handed out; then pass the wake-up on while room is left.

        Waking every waiter at each hand-out would cost a wake-up per waiting
        worker (most finding the room taken already); one woken worker that
        claims and finds room left wakes the next, so I/O-bound workers all
        get going and a worker that never suspends fills the room alone.
        """
        room = new_event()
        self._room_waiters.append(room)
        try:
            await room.wait()
        except BaseException:
            if not room.is_set():
                self._room_waiters.remove(room)
            elif self._room_waiters:  # pass on the wake-up this worker will not use
                self._room_waiters.popleft().set()
            raise

    def _pass_room_on(self, position: int) -> None:
        if self._room_waiters and self._claimable(position):
            self._room_waiters.popleft().set()

    def _wake_all_waiters(self) -> None:
        waiters = self._room_waiters
        while waiters:
            waiters.popleft().set()

    def _claimable(self, position: int) -> bool:
        return position < self._room_end

    def _update_room(self) -> None:
        """Recompute where claims stop: after each hand-out, and when the window grows.

        Kept as a bound rather than computed per claim, since every item
        fetched tests it (benchmark W4b).
        """
        size, window = self._size, self._window
        if self._ordered:
            self._room_end = self._head * size + window
        else:
            # In completion order the window counts the items not handed out
            # yet, so a slow item holds back only its own unit; the span behind
            # it still bounds the units done past the head (the saved state).
            handed_out = (self._head + len(self._done)) * size
            self._room_end = min(handed_out + window, self._head * size + SPAN * window)

    def _next_index(self) -> int:
        index = self._next
        while index in self._resumed_done:
            index += 1
        return index

    async def _claim_unit(self) -> Unit[K] | None:
        """Register the next unit, waiting for room; None at the end or when stopping."""
        size = self._size
        while not self._stopping:
            index = self._next_index()
            if self._end is not None and index >= self._end:
                return None
            if not self._claimable(index * size + (size - 1 if self._bulk else 0)):
                await self._wait_for_room()
                continue
            pending = self._keys_pending
            if pending is not None:  # another worker is reading the next keys
                await pending.wait()
                continue
            order = self._order
            if isinstance(order, KnownOrder):
                keys = order.unit_keys(index)  # no await: claims cannot interleave
            else:
                pending = self._keys_pending = new_event()
                try:
                    keys = await order.unit_keys(index)
                except self._cancelled:
                    raise
                except BaseException as exc:  # the key source failed
                    self._end = index
                    self._fail(index, exc)
                    return None
                finally:
                    self._keys_pending = None
                    pending.set()
            self._next = index + 1
            if len(keys) < size:
                if self._drop_incomplete:
                    # The short last unit is dropped unfetched, and cannot end
                    # a completion-order stream before the units still in flight.
                    keys = []
                self._end = index + 1 if keys else index
                self._tell_consumer()  # a consumer may be waiting for the end
            if not keys:
                return None
            unit = Unit(index, keys)
            self._units[index] = unit
            if self._bulk:
                self._pass_room_on((index + 2) * size - 1)
            return unit
        return None

    async def _claim_item(self) -> tuple[Unit[K], int] | None:
        """The next key to fetch: its unit and its offset there; None at the end."""
        size = self._size
        while not self._stopping:
            unit, offset = self._filling, self._filled
            if unit is not None and offset < len(unit.keys):
                if self._claimable(unit.index * size + offset):
                    self._filled = offset + 1
                    self._pass_room_on(unit.index * size + offset + 1)
                    return unit, offset
                await self._wait_for_room()
                continue
            # The next unit: wait for room here, not in _claim_unit, so that no
            # other worker registers a unit while this one waits (its keys
            # would never be claimed).
            index = self._next_index()
            if self._end is not None and index >= self._end:
                return None
            if not self._claimable(index * size):
                await self._wait_for_room()
                continue
            pending = self._keys_pending
            if pending is not None:
                await pending.wait()
                continue
            unit = await self._claim_unit()
            if unit is None:
                return None
            self._filling, self._filled = unit, 0
        return None

    async def _item_worker(self) -> None:
        fetch = self._fetch_item
        assert fetch is not None
        stats = self.stats
        size = self._size
        cancelled = self._cancelled
        while not self._stopping:
            claim = await self._claim_item()
            if claim is None:
                return
            unit, offset = claim
            keys, items, start = unit.keys, unit.items, unit.index * size
            while True:
                key = keys[offset]
                stats.in_flight += 1
                try:
                    item = await fetch(key)
                except cancelled:
                    raise
                except BaseException as exc:
                    add_key_note(exc, key, self._owner)
                    if not self._left_out(unit, offset, key, exc):
                        return
                else:
                    stats.fetched += 1
                    items[offset] = item
                finally:
                    stats.in_flight -= 1
                unit.missing -= 1
                if not unit.missing:
                    await self._seal(unit)
                # The hot path: the unit's next key, claimed without awaiting
                # while this unit is still the one being claimed (benchmark W4b).
                offset = self._filled
                if (
                    self._filling is not unit
                    or offset >= len(keys)
                    or start + offset >= self._room_end
                    or self._stopping
                ):
                    break
                self._filled = offset + 1

    async def _seal(self, unit: Unit[K]) -> None:
        """Turn the items of a complete unit into its batch (none when they all failed)."""
        if len(unit.left_out) == len(unit.keys):
            self._wake(unit)  # dropped when handed out
            return
        try:
            unit.batch = await self._finish(unit.kept_keys(), unit.kept_items())
        except self._cancelled:
            raise
        except BaseException as exc:
            self._fail(unit.index, exc)
            return
        self._wake(unit)

    def _left_out(self, unit: Unit[K], offset: int, key: K, exc: BaseException) -> bool:
        """Record a failed item; False when the stream must stop instead."""
        self.stats.failed += 1
        if not self._skip or not isinstance(exc, Exception):
            self._fail(unit.index, exc)
            return False
        self.failures.append(Failure(key, exc))
        unit.left_out.append(offset)
        return not self._too_many_failures(final=False)

    def skip_key(self, key: Any, exc: BaseException) -> None:
        """Record a key whose discovery failed, left out of the keys: counted as a failed item."""
        self.stats.failed += 1
        self.failures.append(Failure(key, exc))
        self._too_many_failures(final=False)

    def _too_many_failures(self, final: bool) -> bool:
        """Past ``max_failures``: stop with one error summarising the failures."""
        limit = self._max_failures
        stats = self.stats
        if limit is None or not stats.failed:
            return False
        seen = stats.fetched + stats.failed
        if isinstance(limit, float):
            # A fraction is judged once enough items are seen to measure it.
            if stats.failed <= limit * seen or (seen < 1 / limit and not final):
                return False
        elif stats.failed <= limit:
            return False
        self._fail(self._head, TooManyFailuresError.summarise(self.failures, limit, seen))
        return True

    async def _unit_worker(self) -> None:
        fetch = self._fetch_unit
        assert fetch is not None
        stats = self.stats
        clock = time.perf_counter
        last_yield = clock()
        while not self._stopping:
            unit = await self._claim_unit()
            if unit is None:
                return
            stats.in_flight += len(unit.keys)
            try:
                unit.batch = await fetch(unit.keys)
            except self._cancelled:
                raise
            except BaseException as exc:
                stats.in_flight -= len(unit.keys)
                if not (self._skip and isinstance(exc, Exception)):
                    stats.failed += 1
                    if len(unit.keys) == 1:
                        add_key_note(exc, unit.keys[0], self._owner)
                    self._fail(unit.index, exc)
                    return
                if not await self._salvage(unit):
                    return
                continue
            stats.in_flight -= len(unit.keys)
            stats.fetched += len(unit.keys)
            self._wake(unit)
            # A bulk read served from memory or the page cache may finish
            # without suspending: yield once YIELD_AFTER has passed, so the
            # loop keeps turning, without paying a task switch per unit.
            now = clock()
            if now - last_yield >= YIELD_AFTER:
                last_yield = now
                await anyio.lowlevel.checkpoint()

    async def _salvage(self, unit: Unit[K]) -> bool:
        """After a bulk fetch failed while skipping: fetch the unit item by item."""
        fetch = self._fetch_item
        assert fetch is not None, "a bulk engine that skips failures needs fetch_item"
        for offset, key in enumerate(unit.keys):
            try:
                unit.items[offset] = await fetch(key)
            except self._cancelled:
                raise
            except BaseException as exc:
                add_key_note(exc, key, self._owner)
                if not self._left_out(unit, offset, key, exc):
                    return False
            else:
                self.stats.fetched += 1
        unit.missing = 0
        await self._seal(unit)
        return True


async def map_ordered(
    fn: Callable[[A], Awaitable[R]], args: Sequence[A], concurrency: int, owner: object
) -> list[R]:
    """``[await fn(a) for a in args]`` on the engine: at most ``concurrency`` at once.

    The first failure cancels the rest and is raised as it is, with a note
    naming its argument.
    """
    if len(args) == 1:
        try:
            return [await fn(args[0])]
        except Exception as exc:
            add_key_note(exc, args[0], owner)
            raise
    engine: Engine[A] = Engine(
        KnownOrder(args, batch_size=max(1, len(args))),
        owner=owner,
        concurrency=concurrency,
        fetch_item=fn,
    )
    try:
        unit = await engine.next_unit()
    except StopAsyncIteration:
        return []
    finally:
        await engine.aclose()
    items: list[R] = unit.batch
    return items
