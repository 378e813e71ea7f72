"""``python -m mlworkflow_async demo``: a small pipeline on generated data."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any, NamedTuple

import anyio
import numpy as np

from ._combinators._filtered import FilteredDataset
from ._combinators._transformed import TransformedDataset
from ._core._dataset import Dataset
from ._store._pickled import PickledDataset

LATENCY = 0.005  # simulated seconds of I/O per item
BATCH = 64
CONCURRENCY = 256


class Reading(NamedTuple):
    sensor: int
    seq: int


class SensorDataset(Dataset[Reading, dict[str, Any]]):
    """Generated readings whose every fetch waits ``LATENCY`` seconds, like a remote read."""

    def __init__(self, sensors: int, per_sensor: int) -> None:
        self.sensors = sensors
        self.per_sensor = per_sensor

    def yield_keys(self) -> list[Reading]:
        return [Reading(s, i) for s in range(self.sensors) for i in range(self.per_sensor)]

    async def query_item(self, key: Reading) -> dict[str, Any]:
        await anyio.sleep(LATENCY)
        rng = np.random.default_rng(key.sensor * 1_000_003 + key.seq)
        return {"signal": rng.normal(key.sensor, 1.0, 16).astype(np.float32), "label": key.sensor}


def _normalise(key: Reading, item: dict[str, Any]) -> dict[str, Any]:
    signal = item["signal"]
    return {"signal": (signal - signal.mean()) / (signal.std() + 1e-6), "label": item["label"]}


async def _stream(ds: Dataset[Reading, Any]) -> tuple[int, int, Any, float]:
    start = time.perf_counter()
    n_batches = n_items = 0
    first = None
    # A seeded shuffle: the keys are sorted by sensor, a plain first batch
    # would hold one label only.
    async for keys, batch in ds.batches(BATCH, concurrency=CONCURRENCY, shuffle=0, epoch=0):
        n_batches += 1
        n_items += len(keys)
        if first is None:
            first = batch
    return n_batches, n_items, first, time.perf_counter() - start


async def _run(items: int, folder: str) -> bool:
    sensors = 8
    source = SensorDataset(sensors, max(1, items // sensors))
    print(
        f"mlworkflow-async demo: {len(source):,} generated sensor readings, "
        f"each fetch waits {LATENCY * 1000:.0f} ms like a remote read"
    )
    pipeline: Dataset[Reading, dict[str, Any]] = TransformedDataset(
        FilteredDataset(source, lambda key: key.sensor != sensors - 1), [_normalise]
    )
    kept = len(await pipeline.keys.all())
    print(
        f"  pipeline : SensorDataset -> FilteredDataset(drop sensor {sensors - 1}, by key: "
        f"no fetch) -> TransformedDataset(normalise): {kept:,} items"
    )
    n_batches, n_items, first, elapsed = await _stream(pipeline)
    sequential = n_items * LATENCY
    print(
        f"  batches  : {n_batches} shuffled batches of up to {BATCH} "
        f"({first['signal'].shape[1]} floats + label) in {elapsed:.2f} s with {CONCURRENCY} "
        f"fetches in flight; one at a time would take {sequential:.1f} s "
        f"({sequential / elapsed:.0f}x)"
    )
    labels = np.bincount(first["label"], minlength=sensors - 1).tolist()
    print(
        f"  shuffle  : batches({BATCH}, shuffle=0, epoch=0): the first batch holds "
        f"{labels} items of sensors 0..{sensors - 2}, a new order each epoch"
    )
    path = os.path.join(folder, "readings.pkl")
    start = time.perf_counter()
    written = await PickledDataset.create(pipeline, path, concurrency=CONCURRENCY)
    seconds = time.perf_counter() - start
    async with await PickledDataset.open(path) as packed:
        print(
            f"  packed   : PickledDataset.create wrote {written:,} items "
            f"({packed.file_size / 1e6:.1f} MB) atomically in {seconds:.2f} s"
        )
        n_batches, _, first_packed, reread = await _stream(packed)
    print(
        f"  reread   : {n_batches} batches from the file in {reread:.3f} s, "
        f"{elapsed / reread:.0f}x faster than the remote source"
    )
    return bool(np.array_equal(first["signal"], first_packed["signal"]))


def main(items: int = 2000) -> int:
    with tempfile.TemporaryDirectory() as folder:
        same = asyncio.run(_run(items, folder))
        # The blocking view runs the same code from a plain loop, no ``async``.
        with PickledDataset(os.path.join(folder, "readings.pkl")) as packed:
            keys, batch = next(iter(packed.sync.batches(BATCH, shuffle=0, epoch=0)))
        print(
            f"  blocking : ds.sync.batches() in a plain for loop: first batch keys "
            f"{tuple(keys[0])}, {tuple(keys[1])}..., labels "
            f"{sorted(set(batch['label'].tolist()))}; same data as the async stream: {same}"
        )
    return 0 if same else 1
