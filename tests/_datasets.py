"""Small real datasets for the combinator tests: counting fetches, endless keys."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from mlworkflow_async import Dataset


class Counting(Dataset[Any, Any]):
    """The items of a mapping, counting every fetch per key.

    When ``gate`` is given, each fetch waits for it, so tests can pile up
    concurrent requests before releasing them. ``bulk=True`` makes it a
    batched backend whose ``query_items`` is one call.
    """

    def __init__(
        self,
        mapping: Mapping[Any, Any],
        gate: asyncio.Event | None = None,
        bulk: bool = False,
        context: Any = None,
    ) -> None:
        self.mapping = dict(mapping)
        self.gate = gate
        self.fetches: Counter[Any] = Counter()
        self.bulk_calls: list[list[Any]] = []
        self.waiting = 0
        self.active = 0
        self.max_active = 0
        self.batched_queries = bulk
        if context is not None:
            self.context = context

    def yield_keys(self) -> list[Any]:
        return list(self.mapping)

    async def query_item(self, key: Any) -> Any:
        self.fetches[key] += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                self.waiting += 1
                try:
                    await self.gate.wait()
                finally:
                    self.waiting -= 1
            else:
                await asyncio.sleep(0)  # a real suspension, as I/O would have
            try:
                return self.mapping[key]
            except KeyError:
                raise KeyError(f"{key!r} is not a key of this Counting dataset") from None
        finally:
            self.active -= 1

    async def query_items(
        self, keys: Sequence[Any], concurrency: int | None = None
    ) -> list[Any]:
        if not self.batched_queries:
            return await super().query_items(keys, concurrency)
        self.bulk_calls.append(list(keys))
        for key in keys:
            self.fetches[key] += 1
        return [self.mapping[key] for key in keys]

    @property
    def total(self) -> int:
        return sum(self.fetches.values())


class Endless(Dataset[int, int]):
    """Keys 0, 1, 2... without end, from a plain generator."""

    def yield_keys(self) -> Iterator[int]:
        n = 0
        while True:
            yield n
            n += 1

    async def query_item(self, key: int) -> int:
        return key * 10


class EndlessAsync(Dataset[int, int]):
    """Keys 0, 1, 2... without end, from an async generator that really suspends."""

    def yield_keys(self) -> AsyncIterator[int]:
        return self._keys()

    async def _keys(self) -> AsyncIterator[int]:
        n = 0
        while True:
            await asyncio.sleep(0)
            yield n
            n += 1

    async def query_item(self, key: int) -> int:
        return key * 10
