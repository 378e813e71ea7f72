"""W5: event-loop responsiveness while W3a, W3b and W4 run.

A heartbeat task sleeps 1 ms in a loop; its lag is how much later than asked
it wakes up. The original library has no event loop: its row shows its
longest single blocking call over the same work, which is how long a loop
calling it would freeze.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import tempfile
import time

import numpy as np

from mlworkflow_async import DictDataset, PickledDataset

from ._data import large_items, small_items, write_both
from ._table import Row


async def _heartbeat(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        asked = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - asked - 0.001)


async def _workload(
    small: str, large: str, folder: str, items: dict[int, object], order: list[int]
) -> None:
    async with await PickledDataset.open(small) as ds:
        async for _ in ds.batches(64, keys=order):
            pass
    async with await PickledDataset.open(large) as ds:
        for key in await ds.keys.all():
            array = await ds.query_item(key)
            await asyncio.sleep(0)
            del array
    await PickledDataset.create(DictDataset(items), os.path.join(folder, "w5.pkl"))


async def _measure(small: str, large: str, folder: str, items: dict[int, object]) -> list[float]:
    # Shuffling the keys takes milliseconds of its own: done before measuring.
    order = [key for key in items if isinstance(key, int)]
    random.Random(2).shuffle(order)
    lags: list[float] = []
    stop = asyncio.Event()
    beat = asyncio.create_task(_heartbeat(lags, stop))
    await asyncio.sleep(0.01)
    try:
        await _workload(small, large, folder, items, order)
    finally:
        stop.set()
        await beat
    return lags


def _original_longest_call(small: str, large: str, folder: str, items: dict[int, object]) -> float:
    import mlworkflow

    longest = 0.0
    ds = mlworkflow.PickledDataset(small)
    order = list(ds.keys)
    random.Random(2).shuffle(order)
    batches = ds.batches(64, keys=order)
    while True:
        start = time.perf_counter()
        if next(batches, None) is None:
            break
        longest = max(longest, time.perf_counter() - start)
    ds = mlworkflow.PickledDataset(large)
    for key in ds.keys:
        start = time.perf_counter()
        ds.query_item(key)
        longest = max(longest, time.perf_counter() - start)
    start = time.perf_counter()
    mlworkflow.PickledDataset.create(mlworkflow.DictDataset(items), os.path.join(folder, "o.pkl"))
    return max(longest, time.perf_counter() - start)


def run(quick: bool) -> list[Row]:
    # The original's create of the small items dominates the quick run: fewer of them.
    items = small_items(5_000 if quick else 20_000)
    with tempfile.TemporaryDirectory() as folder:
        small, small_original = write_both(items, folder, "w5a")
        large, large_original = write_both(large_items(16 if quick else 64), folder, "w5b")
        # A first thread hop imports anyio's thread machinery once per process;
        # it is start-up cost, not the steady state measured here.
        asyncio.run(_measure(small, large, folder, {}))
        lags = asyncio.run(_measure(small, large, folder, items))
        # Full garbage collections scan every live object while holding the
        # GIL: with the 20,000 source items alive they take tens of ms. A
        # service freezes its long-lived objects after start-up to avoid that.
        gc.collect()
        gc.freeze()
        try:
            frozen = asyncio.run(_measure(small, large, folder, items))
        finally:
            gc.unfreeze()
        longest = _original_longest_call(small_original, large_original, folder, items)
    p99 = float(np.percentile(lags, 99)) * 1000
    return [
        Row(f"W5 worst loop lag during W3a+W3b+W4 ({len(items):,} small items)", "ms",
            max(lags) * 1000, 20.0, "the 20 ms budget", 1.0, higher_is_better=False),
        Row("W5 same after gc.freeze() of the start-up objects", "ms", max(frozen) * 1000, 20.0,
            "the 20 ms budget", 1.0, higher_is_better=False),
        Row("W5 99th percentile lag", "ms", p99, longest * 1000,
            "mlworkflow 0.6 longest blocking call", None, higher_is_better=False),
    ]
