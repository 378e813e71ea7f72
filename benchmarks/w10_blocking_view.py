"""W10: the blocking view's cost per call, which plain scripts pay at every call.

A blocking call hands a coroutine to the background loop's thread and waits
for it: two thread wake-ups, whatever the call does. Measured on what costs
least once there (a ``DictDataset`` lookup), against anyio's
``BlockingPortal.call`` of the same coroutine on the same loop (what the view
used before), and for ``batches(64)`` against the same stream awaited.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from mlworkflow_async import DictDataset
from mlworkflow_async._core._portal import get_portal

from ._table import Row, Timer, rate


def _per_call(fn: Any, keys: range) -> float:
    started = time.perf_counter()
    for key in keys:
        fn(key)
    return (time.perf_counter() - started) / len(keys)


def _calls(n: int, rounds: int) -> tuple[float, float]:
    ds = DictDataset({i: {"i": i} for i in range(n)})
    view = ds.sync
    portal = get_portal()
    view.query_item(0)
    ours, anyio_call = [], []
    for _ in range(rounds):  # alternate so drift hits both alike
        ours.append(_per_call(view.query_item, range(n)))
        anyio_call.append(_per_call(lambda key: portal.call(ds.query_item, key), range(n)))
    return statistics.median(ours), statistics.median(anyio_call)


def _batches(n: int, rounds: int) -> tuple[float, float]:
    ds = DictDataset({i: {"i": i, "x": float(i)} for i in range(n)})

    def blocking() -> float:
        count = 0
        with Timer() as t:
            for keys, _ in ds.sync.batches(64):
                count += len(keys)
        return rate(count, t.seconds)

    async def awaited() -> float:
        count = 0
        with Timer() as t:
            async for keys, _ in ds.batches(64):
                count += len(keys)
        return rate(count, t.seconds)

    sync_rates, async_rates = [], []
    for _ in range(rounds):
        sync_rates.append(blocking())
        async_rates.append(asyncio.run(awaited()))
    return max(sync_rates), max(async_rates)


def run(quick: bool) -> list[Row]:
    rounds = 3 if quick else 5
    ours, anyio_call = _calls(2_000 if quick else 10_000, rounds)
    sync_rate, async_rate = _batches(20_000 if quick else 100_000, rounds)
    return [
        Row("W10 ds.sync.query_item, one call (DictDataset)", "us", ours * 1e6,
            anyio_call * 1e6, "anyio BlockingPortal.call of the same coroutine", None,
            higher_is_better=False),
        Row("W10 ds.sync.batches(64) of small dicts, collated", "items/s", sync_rate, async_rate,
            "the same batches awaited", None),
    ]
