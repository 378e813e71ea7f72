"""W8: training epochs. Shuffled against sequential reads, resume time, completion order."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

import anyio

from mlworkflow_async import Dataset, DictDataset, PickledDataset

from ._data import small_items
from ._table import Row, Timer, rate

BATCH = 64


async def _epoch_rate(ds: PickledDataset, shuffle: int | None) -> float:
    count = 0
    with Timer(cpu=True) as t:
        async for keys, _ in ds.batches(BATCH, shuffle=shuffle, epoch=1):
            count += len(keys)
    return rate(count, t.seconds)


def _shuffled(folder: str, n: int, rounds: int) -> list[Row]:
    path = os.path.join(folder, "w8.pkl")
    asyncio.run(PickledDataset.create(DictDataset(small_items(n)), path))

    async def measure() -> tuple[float, float]:
        async with await PickledDataset.open(path) as ds:
            await _epoch_rate(ds, None)  # warm the page cache
            shuffled, sequential = [], []
            for _ in range(rounds):  # alternate so drift hits both alike
                shuffled.append(await _epoch_rate(ds, 0))
                sequential.append(await _epoch_rate(ds, None))
        return max(shuffled), max(sequential)

    shuffled, sequential = asyncio.run(measure())
    return [
        Row(f"W8 PickledDataset epoch of {n:,} W3a items, batches(64, shuffle=0)",
            "items/CPU-s", shuffled, sequential, "the same epoch in file order", None),
    ]


async def _first_batch_seconds(ds: Any, **options: Any) -> float:
    start = time.perf_counter()
    stream = ds.batches(BATCH, shuffle=0, epoch=3, **options)
    await anext(stream)
    seconds = time.perf_counter() - start
    await stream.aclose()
    return seconds


def _resume(folder: str, n: int, at: int, rounds: int) -> list[Row]:
    path = os.path.join(folder, "w8-keys.pkl")
    asyncio.run(PickledDataset.create(DictDataset(dict.fromkeys(range(n), 0)), path))

    async def measure() -> tuple[float, float]:
        async with await PickledDataset.open(path) as ds:
            await ds.keys.all()  # in memory after open: what a training script has
            stream = ds.batches(BATCH, shuffle=0, epoch=3)
            await anext(stream)
            state = stream.state_dict()
            await stream.aclose()
            state["position"] = at  # as saved at batch ``at`` of the epoch
            resumed, fresh = [], []
            for _ in range(rounds):
                resumed.append(await _first_batch_seconds(ds, resume=state))
                fresh.append(await _first_batch_seconds(ds))
        return min(resumed), min(fresh)

    resumed, fresh = asyncio.run(measure())
    name = f"W8 resume a shuffled {n:,}-key epoch at batch {at:,}: first batch"
    return [
        Row(name, "ms", resumed * 1000, 10.0, "the 10 ms budget", 1.0, higher_is_better=False),
        Row("W8 same, against a fresh stream's first batch", "ms", resumed * 1000,
            fresh * 1000, "batches(64, shuffle=0) from the start", None, higher_is_better=False),
    ]


FAST, SLOW = 0.01, 1.0  # seconds per item; 1% of the items are slow


class _Straggling(Dataset[int, int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> int:
        # Spread evenly, not every 100th: slow items land in different batches.
        await anyio.sleep(SLOW if (key * 37) % 100 == 0 else FAST)
        return key


async def _straggling_rate(n: int, ordered: bool) -> float:
    count = 0
    with Timer() as t:
        async for keys, _ in _Straggling(n).batches(BATCH, concurrency=128, ordered=ordered):
            count += len(keys)
    return rate(count, t.seconds)


def _completion_order(n: int, rounds: int) -> list[Row]:
    async def measure() -> tuple[float, float]:
        unordered, ordered = [], []
        for _ in range(rounds):
            unordered.append(await _straggling_rate(n, False))
            ordered.append(await _straggling_rate(n, True))
        return max(unordered), max(ordered)

    unordered, ordered = asyncio.run(measure())
    return [
        Row(f"W8 batches(64, concurrency=128, ordered=False), {n:,} items, 1% 100x slower",
            "items/s", unordered, ordered, "ordered=True", None),
    ]


def run(quick: bool) -> list[Row]:
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory() as folder:
        rows = _shuffled(folder, 20_000, rounds)
        rows += _resume(folder, 1_000_000, 10_000, 3 * rounds)  # cheap: take the best of more
    rows += _completion_order(2_000 if quick else 4_000, 2)  # seconds each: 2 rounds
    return rows
