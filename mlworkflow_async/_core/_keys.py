"""The memoized, lazily discovered key sequence behind ``Dataset.keys``."""

from __future__ import annotations

import time
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
    Sized,
)
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.lowlevel

from ..exceptions import KeysNotReadyError
from ._portal import EventLike, new_event

K = TypeVar("K")


def _is_collection(source: object) -> bool:
    return (
        isinstance(source, Sized)
        and isinstance(source, Iterable)
        and not isinstance(source, Iterator)
    )


class KeySequence(Generic[K]):
    """The keys of a dataset, computed once and remembered.

    Iterate with ``async for key in dataset.keys`` or get them all with
    ``await dataset.keys.all()``. The dataset's ``yield_keys()`` runs at most
    once: every iterator, even several running concurrently, reads from the
    same cache and sees every key in order. Leaving a loop early loses
    nothing; the next loop continues from the cache.

    ``len(dataset.keys)`` works once the keys are complete. When
    ``yield_keys()`` returns a sized collection (a list, ``dict.keys()``...)
    they are complete as soon as they are first looked at.

    If pulling a key from an asynchronous ``yield_keys()`` is interrupted
    (cancelled, or it raises), its generator cannot resume; the next pull
    calls ``yield_keys()`` again and skips the keys already cached.
    """

    __slots__ = (
        "__weakref__",
        "_aiter",
        "_aiter_loop",
        "_cache",
        "_claimers",
        "_done",
        "_factory",
        "_iter",
        "_owner",
        "_pulling",
        "_skip",
    )

    def __init__(self, factory: Callable[[], Any], owner: str) -> None:
        self._factory = factory
        self._owner = owner
        self._cache: list[K] = []
        self._done = False
        self._claimers: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._iter: Iterator[K] | None = None
        self._aiter: AsyncIterator[K] | None = None
        self._aiter_loop: object = None  # the event loop (or trio run) iterating _aiter
        self._skip = 0
        self._pulling: EventLike | None = None

    # -- state -----------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True once every key is known (this may start ``yield_keys()``)."""
        self._start()
        return self._done

    @property
    def reach(self) -> int:
        """The most keys one live reader claims at once (0 while none reads).

        A batch stream claims a batch of keys before querying them, the
        blocking view a chunk per round trip to the loop, an ``async for`` one
        key; ``all()`` is not a reader. Datasets whose key discovery produces
        items hold them only for as many keys as live readers may still claim.
        """
        return max(self._claimers.values(), default=0)

    def claim(self, reader: object, reach: int) -> None:
        """Record that ``reader`` (held weakly) claims up to ``reach`` keys at once."""
        if reach > self._claimers.get(reader, 0):
            self._claimers[reader] = reach

    def release(self, reader: object) -> None:
        """``reader`` claims no more keys."""
        self._claimers.pop(reader, None)

    @property
    def known(self) -> tuple[K, ...]:
        """The keys discovered so far, without computing any more."""
        return tuple(self._cache)

    def known_list(self) -> Sequence[K]:
        """The keys discovered so far, not copied: read it, never change it."""
        return self._cache

    def __len__(self) -> int:
        if not self.complete:
            raise KeysNotReadyError(
                f"the length of {self._owner} is not known until all its keys are: "
                f"run `await dataset.keys.all()` first (or `dataset.sync.keys.all()` "
                f"in blocking code); {len(self._cache)} keys are known so far"
            )
        return len(self._cache)

    def __repr__(self) -> str:
        state = "complete" if self._done else "partial"
        return f"<mlworkflow_async.KeySequence of {self._owner}: {len(self._cache)} known, {state}>"

    def __iter__(self) -> Iterator[K]:
        raise TypeError(
            "dataset.keys is asynchronous: use `async for key in dataset.keys`, "
            "`await dataset.keys.all()`, or in blocking code `dataset.sync.keys`"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Live iterators cannot cross processes; complete keys can.
        return {"factory": self._factory, "owner": self._owner,
                "cache": self._cache if self._done else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["factory"], state["owner"])  # type: ignore[misc]
        if state["cache"] is not None:
            self._cache = state["cache"]
            self._done = True

    # -- iteration -------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[K]:
        # An async generator steps for about half what a class's ``async def
        # __anext__`` costs (over known keys: 0.08 against 0.14 µs a key).
        keys = self._iterate()
        self.claim(keys, 1)
        return keys

    async def _iterate(self) -> AsyncIterator[K]:
        i = 0
        # The sequence may swap its list for a longer one with the same start
        # (when its keys turn out to be a collection): the one held stays
        # valid, and is refreshed once read through.
        cache = self._cache
        while True:
            known = len(cache)
            while i < known:
                yield cache[i]
                i += 1
            if not await self.fill_to(i + 1):
                return
            cache = self._cache

    async def all(self) -> list[K]:
        """Compute every key and return them as a new list (yours to shuffle or extend)."""
        return list(await self.sequence())

    async def sequence(self) -> Sequence[K]:
        """Compute every key; return them without a copy: read it, never change it."""
        while not self.complete:
            await self._pull()
        return self._cache

    async def fill_to(self, n: int) -> bool:
        """Discover keys until ``n`` are known; False if there are fewer."""
        while len(self._cache) < n:
            if self.complete:
                return len(self._cache) >= n
            await self._pull()
        return True

    async def slice(self, start: int, stop: int) -> list[K]:
        """The keys from ``start`` to ``stop``, discovering them as needed (fewer at the end)."""
        cache = self._cache
        if len(cache) < stop and not self._done:
            await self.fill_to(stop)
            cache = self._cache
        found = cache[start:stop]
        return found if type(found) is list else list(found)

    async def chunk_from(self, start: int, size: int, budget: float = 0.02) -> tuple[K, ...]:
        """Up to ``size`` keys from ``start``; empty when there are none.

        Waits for at least one key, then gathers more for at most ``budget``
        seconds, so blocking consumers pay one round trip per chunk.
        """
        deadline = time.monotonic() + budget
        while len(self._cache) < start + size and not self.complete:
            if len(self._cache) > start and time.monotonic() > deadline:
                break
            await self._pull()
        return tuple(self._cache[start : start + size])

    # -- internals -------------------------------------------------------

    def _start(self) -> None:
        if self._done or self._iter is not None or self._aiter is not None:
            return
        try:
            source = self._factory()
        except BaseException as exc:
            _note_source(exc, self._owner)
            raise
        if _is_collection(source):
            # A sequence is kept as it is (a lazy one stays lazy); a complete
            # cache is never appended to.
            keys = cast("list[K]", source if isinstance(source, Sequence) else list(source))
            if self._skip and list(keys[: self._skip]) != self._cache:
                raise RuntimeError(f"yield_keys() of {self._owner} changed between calls")
            self._cache = keys
            self._done = True
        elif isinstance(source, AsyncIterable):
            self._aiter = aiter(source)
            self._aiter_loop = None
        elif isinstance(source, Iterable):
            self._iter = iter(source)
        else:
            raise TypeError(
                f"yield_keys() of {self._owner} returned {type(source).__name__}; it must be "
                f"a generator, an async generator, or return an iterable or async iterable"
            )

    def _restart(self) -> None:
        self._iter = None
        self._aiter = None
        self._aiter_loop = None
        self._skip = len(self._cache)

    async def _pull(self) -> None:
        """Discover one more key (or learn there are none)."""
        self._start()
        if self._done:
            return
        if self._iter is not None:
            try:
                while True:
                    key = next(self._iter)
                    if self._skip:
                        self._skip -= 1
                        continue
                    self._cache.append(key)
                    return
            except StopIteration:
                self._done = True
                self._iter = None
            except BaseException as exc:
                self._restart()
                _note_source(exc, self._owner)
                raise
            return
        pulling = self._pulling
        if pulling is not None:
            # Another task is pulling; its key lands in the cache for us too.
            await pulling.wait()
            return
        loop = anyio.lowlevel.current_token().native_token
        if self._aiter_loop is None:
            self._aiter_loop = loop
        elif self._aiter_loop is not loop:
            # asyncio.run() closes the async generators first iterated in its
            # loop when it ends, so one from another loop may look exhausted
            # when it is not: start afresh in this loop, skipping known keys.
            self._restart()
            self._start()
            self._aiter_loop = loop
        pulling = self._pulling = new_event()
        try:
            assert self._aiter is not None
            while True:
                key = await anext(self._aiter)
                if self._skip:
                    self._skip -= 1
                    continue
                self._cache.append(key)
                return
        except StopAsyncIteration:
            self._done = True
            self._aiter = None
        except BaseException as exc:
            self._restart()
            _note_source(exc, self._owner)
            raise
        finally:
            self._pulling = None
            pulling.set()


def _note_source(exc: BaseException, owner: str) -> None:
    """Say on ``exc`` which dataset's keys were being discovered, once."""
    if isinstance(exc, Exception) and not getattr(exc, "_mlworkflow_async_keys_noted", False):
        exc.add_note(f"while discovering the keys of {owner} (its yield_keys())")
        exc._mlworkflow_async_keys_noted = True  # type: ignore[attr-defined]
