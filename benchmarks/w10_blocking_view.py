"""W10: the blocking view's cost per call, which plain scripts pay at every call.

A blocking call hands a coroutine to the background loop's thread and waits
for it: two thread wake-ups, whatever the call does. Measured on what costs
least once there (a ``DictDataset`` lookup), against anyio's
``BlockingPortal.call`` of the same coroutine on the same loop (what the view
used before), and for ``batches(64)`` against the same stream awaited.

A local ``PickledDataset`` (and a ``DictDataset``) is read by ``ds.sync`` on the
calling thread instead: ``query_item`` key by key, as a map-style
``__getitem__`` calls it, against the original ``mlworkflow`` doing the same.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from typing import Any

from mlworkflow_async import DictDataset, PickledDataset, TransformedDataset
from mlworkflow_async._core._portal import call, get_portal

from ._data import small_items, write_both
from ._table import Row, Timer, rate


def _per_call(fn: Any, keys: Any) -> float:
    started = time.perf_counter()
    for key in keys:
        fn(key)
    return (time.perf_counter() - started) / len(keys)


def _calls(n: int, rounds: int) -> tuple[float, float]:
    ds = DictDataset({i: {"i": i} for i in range(n)})
    portal = get_portal()
    call(ds.query_item, 0)
    ours, anyio_call = [], []
    for _ in range(rounds):  # alternate so drift hits both alike
        ours.append(_per_call(lambda key: call(ds.query_item, key), range(n)))
        anyio_call.append(_per_call(lambda key: portal.call(ds.query_item, key), range(n)))
    return statistics.median(ours), statistics.median(anyio_call)


def _scale(key: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"x": item["x"] * 2, "i": item["i"]}


def _file_calls(n: int, rounds: int) -> tuple[float, float, float, float]:
    """Seconds a ``ds.sync.query_item`` of a W3a item, shuffled, and the original's;
    then the same through a transform, as a map-style ``__getitem__`` makes them."""
    import mlworkflow

    with tempfile.TemporaryDirectory() as folder:
        ours_path, original_path = write_both(small_items(n), folder, "w10")
        order = list(range(n))
        random.Random(2).shuffle(order)
        with PickledDataset(ours_path) as ds:
            original = mlworkflow.PickledDataset(original_path)
            chain = TransformedDataset(ds, [_scale])
            original_chain = mlworkflow.TransformedDataset(original, [_scale])
            ours, theirs, chained, theirs_chained = [], [], [], []
            for _ in range(rounds):
                ours.append(_per_call(ds.sync.query_item, order))
                theirs.append(_per_call(original.query_item, order))
                chained.append(_per_call(chain.sync.query_item, order))
                theirs_chained.append(_per_call(original_chain.query_item, order))
    median = statistics.median
    return median(ours), median(theirs), median(chained), median(theirs_chained)


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
    file_call, original_call, chain_call, original_chain = _file_calls(
        5_000 if quick else 20_000, rounds
    )
    return [
        Row("W10 a blocking call (DictDataset.query_item on the loop)", "us", ours * 1e6,
            anyio_call * 1e6, "anyio BlockingPortal.call of the same coroutine", None,
            higher_is_better=False),
        Row("W10 ds.sync.query_item of a PickledDataset, W3a items shuffled", "us",
            file_call * 1e6, original_call * 1e6, "mlworkflow 0.6 query_item", None,
            higher_is_better=False),
        Row("W10 same through a TransformedDataset", "us", chain_call * 1e6,
            original_chain * 1e6, "mlworkflow 0.6, the same transform", None,
            higher_is_better=False),
        Row("W10 ds.sync.batches(64) of small dicts, collated", "items/s", sync_rate, async_rate,
            "the same batches awaited", None),
    ]
