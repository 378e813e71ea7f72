"""W6: the SideRunner queue. 100,000 no-op async calls on SideRunner(10)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import anyio

from mlworkflow_async import SideRunner

from ._table import Row, Timer, rate


async def _noop() -> None:
    return None


async def _ours(n: int) -> float:
    async with SideRunner(10) as runner:
        with Timer() as t:
            for _ in range(n):
                runner.run_async(_noop)
            await runner.collect_runs()
    return rate(n, t.seconds)


async def _raw(n: int) -> float:
    """The obvious hand-written version: a semaphore-bounded task group."""
    limit = asyncio.Semaphore(10)

    async def bounded() -> None:
        async with limit:
            await _noop()

    with Timer() as t:
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(bounded)
    return rate(n, t.seconds)


async def _queued_bytes(n: int) -> float:
    """Memory held per call that waits in the queue (tracemalloc)."""
    gate = asyncio.Event()

    async def wait() -> None:
        await gate.wait()

    async with SideRunner(10) as runner:
        for _ in range(10):
            runner.run_async(wait)  # occupy the workers so the rest stays queued
        await asyncio.sleep(0)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            runner.run_async(_noop)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        gate.set()
        await runner.collect_runs()
    return (after - before) / n


async def _raw_task_bytes(n: int) -> float:
    """The same measure for the raw version, where every pending call is a task."""
    gate = asyncio.Event()
    limit = asyncio.Semaphore(10)

    async def bounded() -> None:
        async with limit:
            await gate.wait()

    async with anyio.create_task_group() as tg:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            tg.start_soon(bounded)
        await asyncio.sleep(0)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        gate.set()
    return (after - before) / n


def run(quick: bool) -> list[Row]:
    n = 20_000 if quick else 100_000
    rounds = 2 if quick else 3

    async def measure() -> tuple[float, float, float, float]:
        await _ours(1000)
        await _raw(1000)
        ours, raw = [], []
        for _ in range(rounds):
            ours.append(await _ours(n))
            raw.append(await _raw(n))
        return max(ours), max(raw), await _queued_bytes(n), await _raw_task_bytes(n // 4)

    ours, raw, queued, raw_bytes = asyncio.run(measure())
    return [
        Row(f"W6 SideRunner(10), {n:,} queued no-op calls", "calls/s", ours, raw,
            "semaphore-bounded task group", 0.5),
        Row("W6 memory per queued call (tracemalloc)", "bytes", queued, 1024.0,
            "the 1 KB budget", 1.0, higher_is_better=False),
        Row("W6 same, for the raw version's pending tasks", "bytes", queued, raw_bytes,
            "raw task per call", None, higher_is_better=False),
    ]
