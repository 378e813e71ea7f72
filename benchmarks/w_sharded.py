"""W7: sharded datasets. Create on a 2-worker Dask LocalCluster against one process; reads.

The create source does about 1 ms of pure-Python work per item (the cost of
decoding or tokenizing), so one process is CPU-bound and workers on other
cores can share the work. The cluster is started, and its workers have
imported the library, before the clock starts: a cluster is kept up for
many datasets. Reads compare a sharded set with one file of the same items.

Each worker runs in a session of its own, as it would on its own machine:
Linux shares a busy machine's CPU between sessions, so workers left in the
benchmark's session would together get one process's share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tempfile
import time
from typing import Any

import numpy as np

from mlworkflow_async import Dataset, DictDataset, PickledDataset

from ._data import small_items
from ._table import Row, Timer, rate


def dask_setup(worker: Any) -> None:
    """Dask worker preload: leave the benchmark's session (see the module docstring)."""
    with contextlib.suppress(OSError):
        os.setsid()


def _spin(rounds: int) -> int:
    total = 0
    for i in range(rounds):
        total += i * i % 7
    return total


def _rounds_per_millisecond() -> int:
    rounds = 10_000
    while True:
        start = time.perf_counter()
        _spin(rounds)
        elapsed = time.perf_counter() - start
        if elapsed > 0.05:
            return max(1, int(rounds / (elapsed * 1000)))
        rounds *= 2


class Decoded(Dataset[int, Any]):
    """``n`` items, each costing ``rounds`` of pure-Python work (about 1 ms)."""

    def __init__(self, n: int, rounds: int) -> None:
        self.n, self.rounds = n, rounds

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> Any:
        return {"i": key, "v": _spin(self.rounds), "x": np.full(16, key, np.float32)}


async def _create(source: Decoded, path: str, **options: Any) -> float:
    with Timer() as t:
        count = await PickledDataset.create(source, path, **options)
    assert count == source.n
    return rate(count, t.seconds)


async def _read(path: str, order: list[int] | None) -> float:
    count = 0
    async with await PickledDataset.open(path) as ds:
        with Timer(cpu=True) as t:
            async for keys, _ in ds.batches(64, keys=order):
                count += len(keys)
    assert count == len(ds)
    return rate(count, t.seconds)


def _creates(folder: str, n: int, rounds: int) -> list[Row]:
    from distributed import Client, LocalCluster

    source = Decoded(n, _rounds_per_millisecond())
    single, sharded = [], []
    with LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
        dashboard_address=":0", silence_logs=logging.ERROR, preload=[__name__],
    ) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("mlworkflow_async"))  # warm workers
        for _ in range(rounds):  # interleaved: a busy spell on the machine hits both
            single.append(asyncio.run(_create(source, os.path.join(folder, "one.pkl"))))
            sharded.append(asyncio.run(
                _create(source, os.path.join(folder, "set"), shards=4, client=client)
            ))
    return [
        Row(f"W9a create {n:,} items of ~1 ms pure-Python work, shards=4 on a 2-worker "
            f"LocalCluster", "items/s", max(sharded), max(single), "create in one process",
            1.6),
    ]


def _reads(folder: str, n: int, rounds: int) -> list[Row]:
    items = small_items(n)
    single, sharded = os.path.join(folder, "w7b.pkl"), os.path.join(folder, "w7b")
    asyncio.run(PickledDataset.create(DictDataset(items), single))
    asyncio.run(PickledDataset.create(DictDataset(items), sharded, shards=4))
    order = list(range(n))
    random.Random(1).shuffle(order)
    rows = []
    for name, keys in (("in key order", None), ("shuffled", order)):
        ours, base = [], []
        for _ in range(rounds):  # interleaved, best of each: noise only slows things down
            ours.append(asyncio.run(_read(sharded, keys)))
            base.append(asyncio.run(_read(single, keys)))
        rows.append(Row(f"W9b {n:,} W3a items, batches(64) {name}, 4 shards", "items/CPU-s",
                        max(ours), max(base), "one file of the same items",
                        0.9 if keys is None else None))
    return rows


def run(quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory() as folder:
        return _creates(folder, 4_000 if quick else 20_000, 2) + _reads(
            folder, 20_000, 3 if quick else 5
        )
