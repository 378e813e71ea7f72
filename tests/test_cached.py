"""CachedDataset: fetch once (concurrently too), fill, LRU bound, failures."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from mlworkflow_async import CachedDataset, DictDataset, KeysNotReadyError
from tests._datasets import Counting, Endless
from tests.conftest import wait_until

SEED = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f"}


async def test_each_item_is_fetched_once() -> None:
    parent = Counting(SEED)
    cached = CachedDataset(parent)
    for _ in range(3):
        assert [await cached.query_item(key) async for key in cached.keys] == list("abcdef")
    assert await cached.query_items([6, 1, 6]) == ["f", "a", "f"]
    assert set(parent.fetches.values()) == {1}
    assert dict(cached.cache) == SEED


async def test_concurrent_first_requests_share_one_fetch() -> None:
    gate = asyncio.Event()
    parent = Counting(SEED, gate=gate)
    cached = CachedDataset(parent)
    tasks = [asyncio.create_task(cached.query_item(2)) for _ in range(20)]
    tasks.append(asyncio.create_task(cached.query_items([2, 3])))
    await wait_until(lambda: parent.waiting == 2)  # key 2 once, key 3 once
    await asyncio.sleep(0)
    assert parent.fetches == {2: 1, 3: 1}
    gate.set()
    results = await asyncio.gather(*tasks)
    assert results == ["b"] * 20 + [["b", "c"]]
    assert parent.fetches == {2: 1, 3: 1}


async def test_a_failed_fetch_reaches_waiters_and_is_not_cached() -> None:
    gate = asyncio.Event()
    parent = Counting(SEED, gate=gate)
    cached = CachedDataset(parent)
    tasks = [asyncio.create_task(cached.query_item(9)) for _ in range(4)]
    await wait_until(lambda: parent.waiting == 1)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, KeyError) and "9" in str(result) for result in results)
    assert parent.fetches[9] == 1
    parent.mapping[9] = "i"
    assert await cached.query_item(9) == "i"
    assert parent.fetches[9] == 2


async def test_a_cancelled_fetch_lets_a_waiter_fetch() -> None:
    gate = asyncio.Event()
    parent = Counting(SEED, gate=gate)
    cached = CachedDataset(parent)
    first = asyncio.create_task(cached.query_item(4))
    await wait_until(lambda: parent.waiting == 1)
    second = asyncio.create_task(cached.query_item(4))
    await asyncio.sleep(0)
    first.cancel()
    await wait_until(lambda: first.done() and parent.fetches[4] == 2)
    gate.set()
    assert await second == "d"
    assert first.cancelled()
    assert await cached.query_item(4) == "d"
    assert parent.fetches[4] == 2


async def test_fill_loads_everything_concurrently_and_bounded() -> None:
    parent = Counting({i: i * 2 for i in range(200)})
    cached = CachedDataset(parent)
    assert await cached.fill(concurrency=8) is cached
    assert len(cached.cache) == 200
    assert 1 < parent.max_active <= 8
    before = parent.total
    assert await cached.query_items(list(range(0, 200, 7))) == list(range(0, 400, 14))
    assert parent.total == before == 200
    with pytest.raises(ValueError, match="concurrency"):
        await cached.fill(concurrency=0)


async def test_fill_propagates_errors() -> None:
    class Broken(Counting):
        async def query_item(self, key: object) -> object:
            if key == 3:
                raise OSError("disk on fire")
            return await super().query_item(key)

    with pytest.raises(OSError, match="disk on fire"):
        await CachedDataset(Broken(SEED)).fill(concurrency=2)


async def test_lru_bound() -> None:
    parent = Counting(SEED)
    cached = CachedDataset(parent, maxsize=2)
    assert cached.maxsize == 2
    await cached.query_item(1)
    await cached.query_item(2)
    await cached.query_item(1)  # 1 is now the most recently used
    await cached.query_item(3)  # evicts 2
    assert list(cached.cache) == [1, 3]
    await cached.query_item(1)
    assert parent.fetches[1] == 1
    await cached.query_item(2)
    assert parent.fetches[2] == 2
    assert await cached.query_items([4, 5, 6]) == ["d", "e", "f"]
    assert len(cached.cache) == 2
    with pytest.raises(ValueError, match="maxsize"):
        CachedDataset(parent, maxsize=0)


async def test_fill_stops_when_a_bounded_cache_is_full() -> None:
    parent = Counting({i: i for i in range(1000)})
    cached = await CachedDataset(parent, maxsize=10).fill(concurrency=1)
    assert len(cached.cache) == 10
    assert parent.total < 1000


async def test_query_items_fetches_only_the_missing_in_one_parent_call() -> None:
    parent = Counting(SEED, bulk=True, context={"v": 1})
    cached = CachedDataset(parent)
    assert cached.batched_queries
    assert cached.context == {"v": 1}
    await cached.query_item(2)
    assert await cached.query_items([1, 2, 3, 1]) == ["a", "b", "c", "a"]
    assert parent.bulk_calls == [[2], [1, 3]]
    batches = [batch async for _, batch in cached.batches(3, wrapper=list)]
    assert batches == [["a", "b", "c"], ["d", "e", "f"]]
    assert parent.bulk_calls == [[2], [1, 3], [4, 5, 6]]


async def test_keys_and_length_are_the_parents() -> None:
    parent = DictDataset(SEED)
    cached = CachedDataset(parent)
    assert cached.keys is parent.keys
    assert len(cached) == 6
    endless = CachedDataset(Endless())
    with pytest.raises(KeysNotReadyError):
        len(endless)
    assert await endless.query_item(5) == 50


async def test_clear_and_pickling() -> None:
    parent = Counting(SEED)
    cached = CachedDataset(parent, maxsize=4)
    await cached.query_items([1, 2])
    copy = pickle.loads(pickle.dumps(cached))
    assert dict(copy.cache) == {1: "a", 2: "b"}
    assert await copy.query_item(3) == "c"
    assert copy.maxsize == 4
    cached.clear()
    assert not cached.cache
    assert await cached.query_item(1) == "a"
    assert parent.fetches[1] == 2


def test_blocking_view_and_successive_event_loops() -> None:
    parent = Counting(SEED)
    cached = CachedDataset(parent)
    assert asyncio.run(cached.query_item(1)) == "a"
    assert cached.sync.query_item(1) == "a"
    asyncio.run(cached.fill())
    assert cached.sync.query([5, 6]).tolist() == ["e", "f"]
    assert set(parent.fetches.values()) == {1}
