"""``python -m mlworkflow_async demo``: a small pipeline on generated data."""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

import anyio
import numpy as np

from .dataset import Dataset

LATENCY = 0.005  # simulated seconds of I/O per item


class Reading(NamedTuple):
    sensor: int
    seq: int


class SensorDataset(Dataset[Reading, dict[str, object]]):
    """Generated readings whose every fetch waits ``LATENCY`` seconds, like a remote read."""

    def __init__(self, sensors: int, per_sensor: int) -> None:
        self.sensors = sensors
        self.per_sensor = per_sensor

    def yield_keys(self) -> list[Reading]:
        return [Reading(s, i) for s in range(self.sensors) for i in range(self.per_sensor)]

    async def query_item(self, key: Reading) -> dict[str, object]:
        await anyio.sleep(LATENCY)
        rng = np.random.default_rng(key.sensor * 1_000_003 + key.seq)
        return {"signal": rng.normal(key.sensor, 1.0, 16).astype(np.float32), "label": key.sensor}


async def _run(items: int) -> None:
    sensors = 8
    ds = SensorDataset(sensors, max(1, items // sensors))
    print(f"mlworkflow-async demo: {len(ds):,} generated sensor readings, "
          f"each fetch waits {LATENCY * 1000:.0f} ms like a remote read")
    start = time.perf_counter()
    n_batches = 0
    shape: tuple[int, ...] = ()
    async for _keys, batch in ds.batches(64, concurrency=256):
        n_batches += 1
        shape = batch["signal"].shape
    elapsed = time.perf_counter() - start
    sequential = len(ds) * LATENCY
    print(f"  batches  : {n_batches} batches of up to 64 (signal {shape}) in {elapsed:.2f} s "
          f"with concurrency=256; one fetch at a time would need {sequential:.1f} s "
          f"({sequential / elapsed:.0f}x)")


def main(items: int = 2000) -> int:
    asyncio.run(_run(items))
    return 0
