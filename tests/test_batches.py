"""Dataset.batches: order, bounds on concurrency and buffering, cancellation, errors."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import anyio
import pytest

from mlworkflow_async import Dataset, DictDataset
from mlworkflow_async._core import _engine as _batching
from mlworkflow_async._core._order import KnownOrder
from tests.conftest import wait_until


class Probe(Dataset[int, int]):
    """Counts fetches in flight; items listed in ``blocked`` wait for ``release``."""

    def __init__(self, n: int, blocked: set[int] | None = None, fail: int | None = None) -> None:
        self.n = n
        self.blocked = blocked or set()
        self.fail = fail
        self.release = asyncio.Event()
        self.active = 0
        self.max_active = 0
        self.started: list[int] = []
        self.finished = 0

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> int:
        self.started.append(key)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if key in self.blocked:
                await self.release.wait()
            else:
                await asyncio.sleep(0)
            if key == self.fail:
                raise ValueError(f"broken item {key}")
            return key
        finally:
            self.active -= 1
            self.finished += 1


async def test_batches_in_key_order_with_incomplete_last_batch() -> None:
    ds = DictDataset({i: i for i in range(10)})
    got = [(keys, batch.tolist()) async for keys, batch in ds.batches(4, concurrency=3)]
    assert got == [([0, 1, 2, 3], [0, 1, 2, 3]), ([4, 5, 6, 7], [4, 5, 6, 7]), ([8, 9], [8, 9])]


async def test_drop_incomplete_and_explicit_keys() -> None:
    ds = DictDataset({i: i for i in range(10)})
    got = [keys async for keys, _ in ds.batches(4, drop_incomplete=True)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7]]
    got = [b.tolist() async for _, b in ds.batches(2, keys=[9, 3, 1])]
    assert got == [[9, 3], [1]]
    assert [k async for k, _ in ds.batches(3, keys=[])] == []


async def test_order_holds_when_items_finish_out_of_order() -> None:
    class Reverse(Dataset[int, int]):
        def yield_keys(self) -> range:
            return range(20)

        async def query_item(self, key: int) -> int:
            for _ in range(20 - key):  # later keys finish first
                await asyncio.sleep(0)
            return key

    got = [k async for keys, _ in Reverse().batches(3, concurrency=20) for k in keys]
    assert got == list(range(20))


@pytest.mark.parametrize(("concurrency", "batch_size"), [(1, 4), (5, 4), (8, 64), (100, 3)])
async def test_concurrency_bounds_fetches_in_flight(concurrency: int, batch_size: int) -> None:
    ds = Probe(200)
    items = [k async for keys, _ in ds.batches(batch_size, concurrency=concurrency) for k in keys]
    assert items == list(range(200))
    assert 1 <= ds.max_active <= concurrency
    if concurrency <= 100:
        assert ds.max_active == concurrency  # the bound is also reached


async def test_later_batches_load_while_earlier_ones_are_handed_out() -> None:
    ds = Probe(1000)
    stream = ds.batches(10, concurrency=100)
    keys, _ = await stream.__anext__()
    assert keys == list(range(10))
    await wait_until(lambda: len(ds.started) >= 100)
    await stream.aclose()


async def test_one_slow_item_does_not_stall_the_others() -> None:
    ds = Probe(500, blocked={5})
    concurrency, batch_size = 10, 4
    stream = ds.batches(batch_size, concurrency=concurrency)
    first = await stream.__anext__()
    assert first[0] == [0, 1, 2, 3]
    consumer = asyncio.create_task(stream.__anext__())  # waits for item 5
    # While item 5 is stuck, finished items free their slots and fetching goes on
    # past it, up to the reorder window.
    window = 2 * concurrency + batch_size
    await wait_until(lambda: ds.finished >= window - 2)
    assert ds.active == 1  # only the slow item holds a slot
    for _ in range(20):
        await asyncio.sleep(0)
    assert max(ds.started) < 4 + window  # the reorder buffer stays bounded
    assert not consumer.done()
    ds.release.set()
    assert (await consumer)[0] == [4, 5, 6, 7]
    rest = [k async for keys, _ in stream for k in keys]
    assert rest == list(range(8, 500))


async def test_early_break_cancels_fetches_and_leaks_no_task() -> None:
    ds = Probe(1000, blocked=set(range(20, 1000)))
    before = len(asyncio.all_tasks())
    async for keys, _ in ds.batches(5, concurrency=50):
        if keys[0] == 10:
            break
    await wait_until(lambda: len(asyncio.all_tasks()) == before)
    await wait_until(lambda: ds.active == 0)
    assert ds.finished == len(ds.started)  # every started fetch ended (cancelled)


async def test_explicit_close_cancels_in_flight_fetches() -> None:
    ds = Probe(100, blocked=set(range(4, 100)))
    async with ds.batches(4, concurrency=8) as stream:
        await stream.__anext__()
        await wait_until(lambda: ds.active == 8)
    assert ds.active == 0
    gc.collect()


async def test_failing_item_stops_the_stream_and_names_its_key() -> None:
    ds = Probe(40, fail=13)
    seen: list[int] = []
    before = len(asyncio.all_tasks())
    with pytest.raises(ValueError, match="broken item 13") as info:
        async for keys, _ in ds.batches(4, concurrency=6):
            seen.extend(keys)
    assert seen == list(range(12))  # batches before the failing one were delivered
    assert any("key 13" in note and "Probe" in note for note in info.value.__notes__)
    await wait_until(lambda: len(asyncio.all_tasks()) == before)


async def test_concurrency_is_validated() -> None:
    ds = DictDataset({1: 1})
    with pytest.raises(ValueError, match="concurrency"):
        ds.batches(2, concurrency=0)
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(0)


async def test_collate_fn_receives_the_items() -> None:
    ds = DictDataset({i: str(i) for i in range(5)})
    got: list[Any] = [b async for _, b in ds.batches(2, collate_fn="".join)]
    assert got == ["01", "23", "4"]


class Bulk(Dataset[int, int]):
    """A backend that fetches many items per call, as PickledDataset does."""

    batched_queries = True

    def __init__(self, n: int, fail: int | None = None, short: bool = False) -> None:
        self.n = n
        self.fail = fail
        self.short = short
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> int:
        return (await self.query_items([key]))[0]

    async def query_items(self, keys: Any) -> list[int]:
        self.calls.append(list(keys))
        await self.release.wait()
        if self.fail in keys:
            raise KeyError(f"key {self.fail} is broken")
        return [k * 2 for k in keys][: -1 if self.short else None]


async def test_bulk_backends_get_one_call_per_batch_in_order() -> None:
    ds = Bulk(10)
    got = [(keys, b.tolist()) async for keys, b in ds.batches(4, concurrency=8)]
    assert got == [
        ([0, 1, 2, 3], [0, 2, 4, 6]),
        ([4, 5, 6, 7], [8, 10, 12, 14]),
        ([8, 9], [16, 18]),
    ]
    assert sorted(ds.calls) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [k async for k, _ in ds.batches(4, drop_incomplete=True)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


async def test_bulk_backend_errors_and_wrong_counts_end_the_stream() -> None:
    with pytest.raises(KeyError, match="key 5 is broken"):
        async for _ in Bulk(12, fail=5).batches(4):
            pass
    with pytest.raises(RuntimeError, match="returned 3 items for 4 keys"):
        async for _ in Bulk(12, short=True).batches(4):
            pass


async def test_bulk_stream_early_break_leaks_no_task() -> None:
    ds = Bulk(1000)
    before = len(asyncio.all_tasks())
    async for _ in ds.batches(10, concurrency=40):
        ds.release.clear()  # later batches stay in flight
        break
    await wait_until(lambda: len(asyncio.all_tasks()) == before)


async def test_in_memory_bulk_reads_let_the_loop_turn_between_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Workers yield once YIELD_AFTER seconds have passed; at zero, after every batch.
    monkeypatch.setattr(_batching, "YIELD_AFTER", 0.0)
    fetched = 0

    class Instant(Bulk):
        async def query_items(self, keys: Any) -> list[int]:
            nonlocal fetched
            fetched += 1
            return list(keys)  # served from memory: never suspends

    most_between_turns = 0
    stop = False

    async def ticker() -> None:
        nonlocal most_between_turns
        seen = fetched
        while not stop:
            most_between_turns = max(most_between_turns, fetched - seen)
            seen = fetched
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    batches = 0
    async for _ in Instant(6400).batches(64, concurrency=128):  # two bulk workers
        batches += 1
    stop = True
    await task
    assert batches == 100
    # Each worker yields after every batch: the loop turns at least once per
    # batch per worker, not once per window of batches.
    assert 1 <= most_between_turns <= 2


async def test_take_ready_hands_out_the_completed_units_in_order_once() -> None:
    async def fetch(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    engine = _batching.Engine(
        KnownOrder(list(range(10)), batch_size=2), owner="test", concurrency=8,
        fetch_unit=fetch,
    )
    try:
        first = await engine.next_unit()
        await wait_until(lambda: len(engine._units) >= 3 and all(
            unit.ready for unit in engine._units.values()
        ))
        ready = engine.take_ready()
        assert [unit.index for unit in [first, *ready]] == list(range(1 + len(ready)))
        assert len(ready) >= 2
        assert engine.take_ready() == []  # nothing is handed out twice
        rest = []
        while True:
            try:
                rest.append(await engine.next_unit())
            except StopAsyncIteration:
                break
        units = [first, *ready, *rest]
        assert [unit.batch for unit in units] == [[k * 10, k * 10 + 10] for k in range(0, 10, 2)]
    finally:
        await engine.aclose()


async def test_hold_lets_more_wait_without_more_fetches_in_flight() -> None:
    active = most = 0
    gate = asyncio.Event()

    async def fetch(key: int) -> int:
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            if key == 0:
                await gate.wait()  # the head stays unfinished: nothing is handed out
            return key
        finally:
            active -= 1

    engine = _batching.Engine(
        KnownOrder(list(range(200)), batch_size=4), owner="test", concurrency=2,
        fetch_item=fetch,
    )
    def claimed() -> int:  # keys handed to workers so far (units of 4)
        return 4 * (engine._next - 1) + engine._filled

    try:
        first = asyncio.ensure_future(engine.next_unit())
        window = 2 * 2 + 4  # the default: twice the concurrency and a batch
        await wait_until(lambda: claimed() == window and active == 1)
        engine.hold(40)
        await wait_until(lambda: claimed() == 40 and active == 1)
        assert most == 2  # more items wait; no more fetches run at once
        gate.set()
        units = [await first]
        while True:
            try:
                units.append(await engine.next_unit())
            except StopAsyncIteration:
                break
        assert [key for unit in units for key in unit.batch] == list(range(200))
        assert most == 2
    finally:
        await engine.aclose()


class Gated(Dataset[int, int]):
    """Every fetch waits for ``gate``; keys come from an async generator held by
    ``keys_gate`` when ``lazy``."""

    def __init__(self, n: int, lazy: bool = False) -> None:
        self.n = n
        self.lazy = lazy
        self.gate = asyncio.Event()
        self.keys_gate = asyncio.Event()
        self.fetched: list[int] = []

    def yield_keys(self) -> Any:
        if not self.lazy:
            return list(range(self.n))

        async def keys() -> Any:
            await self.keys_gate.wait()
            for key in range(self.n):
                yield key

        return keys()

    async def query_item(self, key: int) -> int:
        await self.gate.wait()
        self.fetched.append(key)
        return key


async def test_a_second_task_waiting_on_the_same_stream_is_refused_and_the_first_goes_on() -> None:
    ds = Gated(32)
    stream = ds.batches(8)
    with anyio.fail_after(10):
        first = asyncio.create_task(anext(stream))
        await anyio.wait_all_tasks_blocked()  # waiting for its batch, in the engine
        with pytest.raises(RuntimeError, match="already running") as info:
            await anext(stream)
        assert "BatchStream of Gated" in str(info.value)
        assert "one consumer" in str(info.value)
        assert "lock" in str(info.value)
        ds.gate.set()
        assert (await first)[0] == list(range(8))
        rest = [keys async for keys, _ in stream]
    assert rest == [list(range(8, 16)), list(range(16, 24)), list(range(24, 32))]
    assert sorted(ds.fetched) == list(range(32))  # each item fetched once


async def test_a_second_task_is_refused_while_the_stream_waits_for_its_keys() -> None:
    ds = Gated(20, lazy=True)
    ds.gate.set()
    stream = ds.batches(4, shuffle=1)  # shuffling first awaits every key
    with anyio.fail_after(10):
        first = asyncio.create_task(anext(stream))
        await anyio.wait_all_tasks_blocked()  # preparing: waiting for the keys
        with pytest.raises(RuntimeError, match="already running"):
            await anext(stream)
        ds.keys_gate.set()
        got = [(await first)[0]] + [keys async for keys, _ in stream]
    assert sorted(k for keys in got for k in keys) == list(range(20))
    assert sorted(ds.fetched) == list(range(20))  # one engine: nothing fetched twice


async def test_tasks_taking_turns_with_a_lock_get_distinct_batches_in_order() -> None:
    ds = Gated(40)
    ds.gate.set()
    stream = ds.batches(4)
    lock = anyio.Lock()
    got: list[list[int]] = []

    async def consume() -> None:
        while True:
            async with lock:
                try:
                    keys, _ = await anext(stream)
                except StopAsyncIteration:
                    return
                got.append(keys)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(consume)
    assert got == [list(range(i, i + 4)) for i in range(0, 40, 4)]
