"""Memoized keys: laziness, single enumeration, length, cross-loop reuse."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest

from mlworkflow_async import Dataset, DictDataset, KeysNotReadyError


class CountingKeys(Dataset[int, int]):
    """Async-generated keys that count how often enumeration starts."""

    def __init__(self, n: int, gate: asyncio.Event | None = None) -> None:
        self.n = n
        self.gate = gate
        self.starts = 0
        self.pulled = 0

    async def yield_keys(self) -> AsyncIterator[int]:
        self.starts += 1
        for i in range(self.n):
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            self.pulled += 1
            yield i

    async def query_item(self, key: int) -> int:
        return key * 10


async def test_concurrent_iteration_runs_yield_keys_once() -> None:
    ds = CountingKeys(50)

    async def collect() -> list[int]:
        return [k async for k in ds.keys]

    results = await asyncio.gather(*(collect() for _ in range(5)))
    assert all(r == list(range(50)) for r in results)
    assert ds.starts == 1
    assert ds.pulled == 50


async def test_break_early_then_continue_from_cache() -> None:
    ds = CountingKeys(10)
    first = []
    async for k in ds.keys:
        first.append(k)
        if k == 3:
            break
    assert first == [0, 1, 2, 3]
    assert ds.pulled == 4
    assert await ds.keys.all() == list(range(10))
    assert ds.starts == 1


async def test_len_before_and_after_keys_are_known() -> None:
    ds = CountingKeys(7)
    with pytest.raises(KeysNotReadyError) as info:
        len(ds)
    assert isinstance(info.value, RuntimeError)
    assert "await dataset.keys.all()" in str(info.value)
    assert ds.pulled == 0  # asking for len() computes nothing
    await ds.keys.all()
    assert len(ds) == 7


def test_sized_keys_known_at_once() -> None:
    ds = DictDataset({"a": 1, "b": 2})
    assert len(ds) == 2
    assert ds.keys.complete


def test_sync_iteration_of_async_keys_is_refused_with_a_hint() -> None:
    ds = DictDataset({"a": 1})
    with pytest.raises(TypeError, match="async for"):
        iter(ds.keys)


async def test_cancelled_pull_resumes_without_losing_or_repeating_keys() -> None:
    gate = asyncio.Event()
    ds = CountingKeys(5, gate)
    gate.set()
    assert [k async for k in _take(ds.keys, 2)] == [0, 1]
    gate.clear()
    task = asyncio.create_task(ds.keys.all())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    assert await ds.keys.all() == [0, 1, 2, 3, 4]


async def _take(keys: object, n: int) -> AsyncIterator[int]:
    count = 0
    async for k in keys:  # type: ignore[attr-defined]
        yield k
        count += 1
        if count == n:
            return


def test_same_dataset_across_event_loops() -> None:
    ds = CountingKeys(6)

    async def partial() -> list[int]:
        return [k async for k in _take(ds.keys, 3)]

    async def rest() -> tuple[int, ...]:
        return await ds.keys.all()

    assert asyncio.run(partial()) == [0, 1, 2]
    # The first loop closed its async generators on exit; keys still complete.
    assert asyncio.run(rest()) == list(range(6))

    async def batches() -> list[list[int]]:
        return [batch.tolist() async for _, batch in ds.batches(4)]

    assert asyncio.run(batches()) == [[0, 10, 20, 30], [40, 50]]
    assert asyncio.run(batches()) == [[0, 10, 20, 30], [40, 50]]
    assert ds.sync.query([1, 2]).tolist() == [10, 20]


async def test_key_source_error_propagates_and_can_be_retried() -> None:
    class Flaky(Dataset[int, int]):
        calls = 0

        async def yield_keys(self) -> AsyncIterator[int]:
            Flaky.calls += 1
            yield 0
            if Flaky.calls == 1:
                raise OSError("listing failed")
            yield 1

        async def query_item(self, key: int) -> int:
            return key

    ds = Flaky()
    with pytest.raises(OSError, match="listing failed"):
        await ds.keys.all()
    assert await ds.keys.all() == [0, 1]


async def test_reach_is_the_most_keys_a_live_reader_claims_at_once() -> None:
    keys = CountingKeys(100).keys
    assert keys.reach == 0  # nobody reads: discovery needs to hold nothing
    iterator = aiter(keys)
    assert keys.reach == 1  # one key at a time, as `async for` reads them
    assert [await anext(iterator), await anext(iterator)] == [0, 1]

    class Reader:
        pass

    reader = Reader()
    keys.claim(reader, 20)
    assert keys.reach == 20
    keys.release(reader)
    assert keys.reach == 1
    keys.claim(reader, 30)
    del reader, iterator
    gc.collect()
    assert keys.reach == 0  # readers are held weakly: gone, they claim nothing


async def test_iterators_made_before_the_keys_are_looked_at_see_them_all() -> None:
    ds = DictDataset({i: i for i in range(5)})
    early, other = aiter(ds.keys), aiter(ds.keys)
    assert await anext(early) == 0  # the sequence learns its keys are a collection here
    assert [key async for key in other] == [0, 1, 2, 3, 4]
    assert [key async for key in early] == [1, 2, 3, 4]
