"""An in-memory memo with single-flight loading and an optional LRU bound.

Shared by the combinators that promise to fetch something once: the first
task to miss a key loads it; tasks asking for the same key meanwhile wait
for that load instead of starting their own. Nothing here is bound to an
event loop: waiters create their futures on whichever loop is running.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from itertools import islice
from typing import Any, Generic, TypeVar

import anyio

__all__ = ["MISSING", "Memo"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Missing(enum.Enum):
    MISSING = 0


#: Returned by :meth:`Memo.lookup` on a miss (values themselves may be None).
MISSING = _Missing.MISSING


class _Abandoned(Exception):
    """The loading task was cancelled; a waiter should load by itself."""


class _Flight(Generic[K, T]):
    """One load in progress, of one key or of a batch of keys."""

    __slots__ = ("abandoned", "error", "fetched", "keys", "settled", "waiters")

    def __init__(self, keys: list[K]) -> None:
        self.keys = keys
        self.fetched: Sequence[T] = ()
        self.settled = False
        self.abandoned = False
        self.error: BaseException | None = None
        self.waiters: anyio.Event | None = None

    def settle(self, fetched: Sequence[T], error: BaseException | None) -> None:
        self.settled = True
        self.fetched = fetched
        if error is not None:
            if isinstance(error, Exception):
                self.error = error
            else:
                # Cancellation or interpreter exit concern the loader only;
                # the waiters retry on their own instead of inheriting it.
                self.abandoned = True
        waiters, self.waiters = self.waiters, None
        if waiters is not None:
            waiters.set()

    async def wait(self, key: K) -> T:
        if not self.settled:
            if self.waiters is None:
                self.waiters = anyio.Event()
            await self.waiters.wait()
        if self.error is not None:
            raise self.error
        if self.abandoned:
            raise _Abandoned
        # Only waiters pay for finding their key in the batch.
        return self.fetched[self.keys.index(key)]


#: Stands for a single load in flight that no other task waits for yet.
_UNWATCHED: Any = _Flight([])


class Memo(Generic[K, T]):
    """Values by key, each loaded once, optionally keeping only ``maxsize`` of them.

    When bounded, the least recently used value goes first, or with
    ``lru=False`` the least recently loaded one: better for values read in
    the order they were loaded, as reading them does not keep them alive.
    """

    __slots__ = ("_data", "_flights", "_lru", "maxsize")

    def __init__(self, maxsize: int | None = None, lru: bool = True) -> None:
        if maxsize is not None and maxsize < 1:
            raise ValueError(f"maxsize must be None (unbounded) or at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._lru = lru and maxsize is not None
        # Only LRU needs an OrderedDict; a plain dict keeps insertion order.
        self._data: dict[K, T] = OrderedDict() if self._lru else {}
        self._flights: dict[K, _Flight[K, T]] = {}

    @property
    def data(self) -> Mapping[K, T]:
        """The values held now (reading it does not refresh recency)."""
        return self._data

    def lookup(self, key: K) -> T | _Missing:
        value = self._data.get(key, MISSING)
        if self._lru and value is not MISSING:
            self._data.move_to_end(key)  # type: ignore[attr-defined]
        return value

    def _trim(self) -> None:
        data = self._data
        maxsize = self.maxsize
        if maxsize is not None and len(data) > maxsize:
            # The oldest entries come first in either kind of dict; drop them
            # in one C-level pass rather than a Python loop.
            oldest = list(islice(data, len(data) - maxsize))
            deque(map(data.__delitem__, oldest), maxlen=0)

    def clear(self) -> None:
        self._data.clear()

    async def load(self, key: K, fetch: Callable[[K], Awaitable[T]]) -> T:
        """The value of ``key``, from memory, from a load in flight, or from ``fetch(key)``."""
        value = self.lookup(key)
        if value is not MISSING:
            return value
        data = self._data
        flights = self._flights
        if key in flights:
            return await self._join(key, fetch)
        # The flight is only built if another task comes to wait for it.
        flights[key] = _UNWATCHED
        try:
            value = await fetch(key)
        except BaseException as exc:
            flight = flights.pop(key)
            if flight is not _UNWATCHED:
                flight.settle((), exc)
            raise
        data[key] = value
        if self.maxsize is not None and len(data) > self.maxsize:
            del data[next(iter(data))]
        flight = flights.pop(key)
        if flight is not _UNWATCHED:
            flight.settle((value,), None)
        return value

    def _watch(self, key: K) -> _Flight[K, T]:
        """The flight loading ``key`` (which is in flight), built if nobody watched it yet."""
        flight = self._flights[key]
        if flight is _UNWATCHED:
            flight = self._flights[key] = _Flight([key])
        return flight

    async def _join(self, key: K, fetch: Callable[[K], Awaitable[T]]) -> T:
        """Wait for the load of ``key`` in flight; load it if that load is abandoned."""
        try:
            return await self._watch(key).wait(key)
        except _Abandoned:
            return await self.load(key, fetch)

    async def load_many(
        self, keys: Sequence[K], fetch_many: Callable[[list[K]], Awaitable[Sequence[T]]]
    ) -> list[T]:
        """The values of ``keys``; the ones nobody holds or loads come from one ``fetch_many``."""
        data = self._data
        if (
            not self._flights
            and data.keys().isdisjoint(keys)
            and len(set(keys)) == len(keys)
        ):
            # None held, none loading, none repeated: the usual case when
            # discovering keys, handled with bulk operations only.
            return await self._fetch_all(list(keys), fetch_many)
        get = data.get
        values: list[Any] = [get(key, MISSING) for key in keys]
        missing = [index for index, value in enumerate(values) if value is MISSING]
        if self._lru and len(missing) < len(values):
            refresh = data.move_to_end  # type: ignore[attr-defined]
            for key, value in zip(keys, values, strict=True):
                if value is not MISSING:
                    refresh(key)
        if not missing:
            return values
        flights = self._flights
        flight: _Flight[K, T]
        waits: list[tuple[int, _Flight[K, T]]] = []
        mine = list(dict.fromkeys([keys[index] for index in missing]))
        if not flights and len(mine) == len(missing):
            # Nothing else loading and no repeated key: register in bulk.
            mine_at = missing
            flight = _Flight(mine)
            flights.update(dict.fromkeys(mine, flight))
        else:
            mine, mine_at = [], []
            flight = _Flight(mine)
            for index in missing:
                key = keys[index]
                if key in flights:
                    waits.append((index, self._watch(key)))
                else:
                    flights[key] = flight
                    mine.append(key)
                    mine_at.append(index)
        if mine:
            fetched = await self._fetch_registered(mine, flight, fetch_many)
            for index, value in zip(mine_at, fetched, strict=True):
                values[index] = value
        for index, other in waits:
            key = keys[index]
            try:
                values[index] = await other.wait(key)
            except _Abandoned:
                values[index] = (await self.load_many([key], fetch_many))[0]
        return values

    async def _fetch_all(
        self, mine: list[K], fetch_many: Callable[[list[K]], Awaitable[Sequence[T]]]
    ) -> list[T]:
        flight: _Flight[K, T] = _Flight(mine)
        self._flights.update(dict.fromkeys(mine, flight))
        return list(await self._fetch_registered(mine, flight, fetch_many))

    async def _fetch_registered(
        self,
        mine: list[K],
        flight: _Flight[K, T],
        fetch_many: Callable[[list[K]], Awaitable[Sequence[T]]],
    ) -> Sequence[T]:
        """Fetch ``mine``, registered as loading by ``flight``; store and hand out the values."""
        try:
            # Callers hand in fetches that check their counts (one value per key).
            fetched = await fetch_many(mine)
        except BaseException as exc:
            self._land(mine)
            flight.settle((), exc)
            raise
        self._data.update(zip(mine, fetched, strict=True))
        self._trim()
        self._land(mine)
        flight.settle(fetched, None)
        return fetched

    def _land(self, mine: list[K]) -> None:
        """Unregister the loads of ``mine``, which are all still registered."""
        flights = self._flights
        if len(flights) == len(mine):
            flights.clear()  # they are the only ones
        else:
            for key in mine:
                del flights[key]

    def __getstate__(self) -> dict[str, Any]:
        # Loads in flight belong to a running loop; only settled values travel.
        # The mapping itself, not a copy: whoever shares it keeps sharing it.
        return {"maxsize": self.maxsize, "lru": self._lru, "data": self._data}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["maxsize"], state["lru"])  # type: ignore[misc]
        self._data = state["data"]
