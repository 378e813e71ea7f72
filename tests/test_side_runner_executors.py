"""SideRunner with executors: thread and process pools, and a real Dask cluster."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mlworkflow_async import SideRunner
from mlworkflow_async.sync import SideRunner as BlockingSideRunner

from ._runner_tasks import fail, sum_of_squares, token, where
from .conftest import wait_until


class RecordingPool(cf.ThreadPoolExecutor):
    """A real thread pool that keeps the futures it hands out."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers)
        self.futures: list[cf.Future[Any]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future


async def test_pool_size_bounds_runs_even_with_a_bigger_executor() -> None:
    lock = threading.Lock()
    now = peak = 0
    together = threading.Barrier(2, timeout=5)

    def work() -> None:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        together.wait()
        with lock:
            now -= 1

    with cf.ThreadPoolExecutor(8) as pool:
        async with SideRunner(2, executor=pool) as runner:
            for _ in range(10):
                runner.do(work)
    assert peak == 2


async def test_cancellation_cancels_queued_executor_futures() -> None:
    release = threading.Event()
    started: list[int] = []

    def blocking(i: int) -> None:
        started.append(i)
        release.wait(5)

    with RecordingPool(1) as pool:

        async def body() -> None:
            async with SideRunner(3, executor=pool) as runner:
                for i in range(5):
                    runner.do(blocking, i)

        task = asyncio.create_task(body())
        await wait_until(lambda: started == [0] and len(pool.futures) == 3)
        task.cancel()
        await wait_until(lambda: pool.futures[1].cancelled() and pool.futures[2].cancelled())
        assert not task.done()  # the call already running is waited for
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert started == [0]
    assert len(pool.futures) == 3  # the two calls still in the runner's queue never left it


# -- processes ------------------------------------------------------------


@pytest.fixture(scope="module")
def process_pool() -> Iterator[cf.ProcessPoolExecutor]:
    context = multiprocessing.get_context("spawn")  # no fork of a threaded process
    with cf.ProcessPoolExecutor(2, mp_context=context) as pool:
        yield pool


async def test_process_pool_runs_cpu_work_in_other_processes(
    process_pool: cf.ProcessPoolExecutor,
) -> None:
    async with SideRunner(2, executor=process_pool) as runner:
        sums = [runner.run_async(sum_of_squares, n) for n in (10, 1000, 5)]
        for i in range(6):
            runner.run_async(where, i)
        results = await runner.collect_runs()
    assert await asyncio.gather(*sums) == [285, 332833500, 30]
    assert [x for x, _ in results[3:]] == list(range(6))
    assert os.getpid() not in {pid for _, pid in results[3:]}


async def test_process_pool_failure_reaches_collect_runs(
    process_pool: cf.ProcessPoolExecutor,
) -> None:
    async with SideRunner(2, executor=process_pool) as runner:
        runner.run_async(sum_of_squares, 3)
        runner.run_async(fail, "in a child process")
        with pytest.raises(ExceptionGroup) as info:
            await runner.collect_runs()
    [error] = info.value.exceptions
    assert isinstance(error, ValueError)
    assert str(error) == "in a child process"


def test_blocking_runner_with_a_process_pool(process_pool: cf.ProcessPoolExecutor) -> None:
    with BlockingSideRunner(2, executor=process_pool) as runner:
        for n in range(4):
            runner.run_async(sum_of_squares, n)
        assert runner.collect_runs() == [0, 0, 1, 5]


# -- a Dask cluster -------------------------------------------------------


async def test_dask_client_runs_work_on_its_workers(dask_client: Any) -> None:
    worker_pids = set(dask_client.run(os.getpid).values())
    assert len(worker_pids) == 2
    async with SideRunner(2, executor=dask_client) as runner:
        for i in range(8):
            runner.run_async(where, i)
        results = await runner.collect_runs()
        # Identical calls all run: a Client is used with pure=False.
        first, second = runner.run_async(token), runner.run_async(token)
        assert await first != await second
    assert [x for x, _ in results] == list(range(8))
    assert {pid for _, pid in results} <= worker_pids


async def test_dask_failure_reaches_collect_runs(dask_client: Any) -> None:
    async with SideRunner(2, executor=dask_client.get_executor()) as runner:
        runner.run_async(sum_of_squares, 4)
        runner.run_async(fail, "on a dask worker")
        results = await runner.collect_runs(return_exceptions=True)
        assert results[0] == 14
        assert isinstance(results[1], ValueError)
        runner.run_async(fail, "raised")
        with pytest.raises(ExceptionGroup) as info:
            await runner.collect_runs()
    assert [str(e) for e in info.value.exceptions] == ["raised"]


def test_blocking_runner_with_a_dask_client(dask_client: Any) -> None:
    with BlockingSideRunner(2, executor=dask_client) as runner:
        futures = [runner.run_async(sum_of_squares, n) for n in range(5)]
        assert runner.collect_runs() == [0, 0, 1, 5, 14]
    assert futures[4].result() == 14


def test_the_package_imports_without_dask() -> None:
    code = (
        "import sys\n"
        "sys.modules['distributed'] = sys.modules['dask'] = None\n"
        "import mlworkflow_async, mlworkflow_async.sync\n"
        "from mlworkflow_async.sync import SideRunner\n"
        "with SideRunner(2) as runner:\n"
        "    runner.run_async(abs, -3)\n"
        "    print(runner.collect_runs())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[3]"
