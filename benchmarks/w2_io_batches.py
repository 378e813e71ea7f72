"""W2: I/O-bound batches. Every item awaits 10 ms of simulated I/O."""

from __future__ import annotations

import asyncio
import time

import anyio

from mlworkflow_async import Dataset

from ._table import Row, Timer, rate

LATENCY = 0.010


async def _item(key: int) -> int:
    await anyio.sleep(LATENCY)
    return key


class _Sleepy(Dataset[int, int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> int:
        return await _item(key)


async def _ours(n: int) -> float:
    count = 0
    with Timer() as t:
        async for keys, _ in _Sleepy(n).batches(64, concurrency=1000):
            count += len(keys)
    assert count == n
    return rate(n, t.seconds)


async def _raw_pool(n: int) -> float:
    """The obvious hand-written version: 1,000 workers draining a queue."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    out: list[int | None] = [None] * n

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            out[i] = await _item(i)

    with Timer() as t:
        await asyncio.gather(*(worker() for _ in range(1000)))
    return rate(n, t.seconds)


def _original_threads(n: int) -> float:
    import mlworkflow

    runner = mlworkflow.SideRunner(64)
    with Timer() as t:
        for _ in range(n):
            runner.run_async(time.sleep, LATENCY)
        runner.collect_runs()
    return rate(n, t.seconds)


def run(quick: bool) -> list[Row]:
    n = 20_000 if quick else 100_000
    rounds = 2 if quick else 3

    async def measure() -> tuple[float, float]:
        await _ours(2000)  # warm-up: first task creations and timer heap growth
        await _raw_pool(2000)
        ours, raw = [], []
        for _ in range(rounds):  # alternate so drift hits both alike
            ours.append(await _ours(n))
            raw.append(await _raw_pool(n))
        return max(ours), max(raw)

    ours, raw = asyncio.run(measure())
    threads = _original_threads(n // 10 if quick else n // 4)
    return [
        Row("W2 I/O-bound batches(64, concurrency=1000)", "items/s", ours, raw,
            "raw asyncio pool of 1000", 0.95),
        Row("W2 same, vs original SideRunner(64) threads", "items/s", ours, threads,
            "mlworkflow SideRunner(64)", None),
    ]
