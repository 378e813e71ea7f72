"""The executor adapter: real thread pools, real process pools and a real Dask cluster."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from mlworkflow_async._core._executors import WorkerPool, worker_pool
from mlworkflow_async.exceptions import WorkerDiedError

from .conftest import block_until_exists, wait_until


def scale(key: int, value: int) -> int:
    return key * value


def pid_of(key: int, value: Any) -> int:
    return os.getpid()


def die_on_3(key: int, value: int) -> int:
    if key == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def fail_on_2(key: int, value: int) -> int:
    if key == 2:
        raise ValueError(f"no {key}")
    return value


def wait_for_file(key: int, path: str) -> int:
    """Block until ``path`` exists (bounded), then record ``key`` in it."""
    block_until_exists(path)
    with open(path, "a") as f:
        f.write(f"{key}\n")
    return key


def shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"mlwa-{os.getpid()}-")}


# -- pools made by the adapter ---------------------------------------------


@pytest.fixture(scope="module")
def processes() -> Iterator[WorkerPool]:
    pool = WorkerPool("process", 2)
    yield pool
    pool.close()


@pytest.fixture
def threads() -> Iterator[WorkerPool]:
    pool = WorkerPool("thread", 2)
    yield pool
    pool.close()


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_results_keep_the_order_of_the_batch(kind: str, processes: WorkerPool) -> None:
    pool = processes if kind == "process" else WorkerPool("thread", 2)
    args = [(k, 3) for k in range(11)]
    assert await pool.run_batch(scale, args) == [3 * k for k in range(11)]
    assert await pool.run_batch(scale, args[:1]) == [0]
    assert await pool.run_batch(scale, []) == []
    pids = set(await pool.run_batch(pid_of, [(k, None) for k in range(8)]))
    if kind == "process":
        assert os.getpid() not in pids
    else:
        assert pids == {os.getpid()}
    pool.close()


async def test_lambdas_closures_and_async_callables_run_in_processes(
    processes: WorkerPool,
) -> None:
    offset = 100
    assert await processes.run_batch(lambda k, v: k + v + offset, [(1, 2), (3, 4)]) == [103, 107]

    async def shifted(key: int, value: int) -> tuple[int, int, bool]:
        await asyncio.sleep(0)
        return key + offset, os.getpid(), asyncio.get_running_loop() is not None

    results = await processes.run_batch(shifted, [(k, 0) for k in range(5)])
    assert [r[0] for r in results] == [100, 101, 102, 103, 104]
    assert os.getpid() not in {r[1] for r in results}


async def test_async_callables_stay_on_the_loop_with_threads(threads: WorkerPool) -> None:
    loop = asyncio.get_running_loop()

    async def on_which_loop(key: int, value: int) -> bool:
        return asyncio.get_running_loop() is loop

    assert await threads.run_batch(on_which_loop, [(1, 1), (2, 2)]) == [True, True]


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_a_failure_names_the_key_and_carries_the_worker_traceback(
    kind: str, processes: WorkerPool
) -> None:
    pool = processes if kind == "process" else WorkerPool("thread", 2)
    seen: list[int] = []

    def note(exc: BaseException, index: int) -> None:
        seen.append(index)
        exc.add_note(f"while querying key {index * 10}")

    with pytest.raises(ValueError, match="no 2") as info:
        await pool.run_batch(fail_on_2, [(k, k) for k in range(6)], on_error=note)
    assert seen == [2]
    assert "while querying key 20" in info.value.__notes__
    if kind == "process":
        # The traceback from the worker, as the cause.
        assert "fail_on_2" in str(info.value.__cause__)
        assert 'raise ValueError(f"no {key}")' in str(info.value.__cause__)
    else:
        assert "fail_on_2" in "".join(__import__("traceback").format_tb(info.value.__traceback__))
    # The pool still works.
    assert await pool.run_batch(scale, [(2, 2)]) == [4]
    pool.close()


async def test_an_unpicklable_exception_still_travels(processes: WorkerPool) -> None:
    def raise_local(key: int, value: int) -> None:
        class Local(Exception):
            def __reduce__(self) -> Any:
                raise TypeError("no pickling")

        raise Local(f"local {key}")

    with pytest.raises(RuntimeError, match="Local: local 0"):
        await processes.run_batch(raise_local, [(0, 0)])


async def test_a_killed_worker_names_the_key_and_the_pool_recovers() -> None:
    pool = WorkerPool("process", 2)
    try:
        assert await pool.run_batch(scale, [(1, 1)]) == [1]
        with pytest.raises(WorkerDiedError, match=r"SIGKILL.*die_on_3 on key 3; the pool starts"):
            await pool.run_batch(die_on_3, [(k, k) for k in range(8)], keys=list(range(8)))
        assert await pool.run_batch(scale, [(k, 2) for k in range(4)]) == [0, 2, 4, 6]
    finally:
        pool.close()


async def test_a_death_is_told_the_same_to_every_batch_it_drops(tmp_path: Path) -> None:
    pool = WorkerPool("process", 2)
    gate = tmp_path / "gate"
    try:
        await pool.run_batch(scale, [(0, 0), (1, 1)])
        innocent = asyncio.create_task(
            pool.run_batch(wait_for_file, [(0, str(gate))], keys=["innocent"])
        )
        await wait_until(lambda: any(c.progress()[0] == 0 for c in pool._in_flight))
        culprit = asyncio.create_task(pool.run_batch(die_on_3, [(3, 3)], keys=[3]))
        errors = await asyncio.gather(innocent, culprit, return_exceptions=True)
        for error in errors:
            assert isinstance(error, WorkerDiedError)
            assert "(killed by SIGKILL) while running die_on_3 on key 3" in str(error)
        assert "wait_for_file on key 'innocent' and more was dropped" in str(errors[0])
    finally:
        pool.close()


async def test_a_killed_worker_of_a_given_process_pool() -> None:
    context = multiprocessing.get_context("forkserver")
    with cf.ProcessPoolExecutor(2, mp_context=context) as executor:
        pool = worker_pool(executor)
        assert pool is not None
        assert await pool.run_batch(lambda k, v: -k, [(1, 0), (2, 0)]) == [-1, -2]
        with pytest.raises(WorkerDiedError, match=r"key 3.*unusable now: make a new one"):
            await pool.run_batch(die_on_3, [(k, k) for k in range(6)], keys=list(range(6)))


# -- leaving early ----------------------------------------------------------


async def test_cancelling_drops_queued_chunks_and_stops_running_ones(tmp_path: Path) -> None:
    pool = WorkerPool("thread", 1)
    gate = tmp_path / "gate"
    try:
        first = asyncio.create_task(
            pool.run_batch(wait_for_file, [(k, str(gate)) for k in range(3)])
        )
        second = asyncio.create_task(pool.run_batch(wait_for_file, [(9, str(gate))]))
        await wait_until(
            lambda: len(pool._in_flight) == 2 and any(c.progress()[0] == 0 for c in pool._in_flight)
        )
        second.cancel()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.touch()
        pool.close()  # waits for the running item
        # The running chunk stopped after its item; the queued one never ran.
        assert gate.read_text() == "0\n"
    finally:
        pool.close()


async def test_cancelling_stops_a_worker_process_between_items(tmp_path: Path) -> None:
    pool = WorkerPool("process", 1)
    gate = tmp_path / "gate"
    try:
        await pool.run_batch(scale, [(0, 0)])  # started
        task = asyncio.create_task(
            pool.run_batch(wait_for_file, [(k, str(gate)) for k in range(4)], wait_running=True)
        )
        await wait_until(lambda: any(c.progress()[0] == 0 for c in pool._in_flight))
        task.cancel()
        await asyncio.sleep(0)
        gate.touch()  # the worker finishes its item, then sees the stop request
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.read_text() == "0\n"
        assert await pool.run_batch(scale, [(3, 3)]) == [9]
    finally:
        pool.close()


async def test_the_loop_turns_while_processes_work(tmp_path: Path) -> None:
    # The workers wait for a file that only the loop makes, meanwhile.
    pool = WorkerPool("process", 2)
    gate = tmp_path / "gate"
    try:
        work = asyncio.create_task(
            pool.run_batch(wait_for_file, [(k, str(gate)) for k in range(4)])
        )
        await wait_until(lambda: bool(pool._in_flight))
        await asyncio.sleep(0)
        gate.touch()
        assert await work == [0, 1, 2, 3]
    finally:
        pool.close()


# -- arrays through shared memory -------------------------------------------


def in_shared_memory(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a memory-mapped segment."""
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def array_facts(key: int, array: np.ndarray) -> tuple[bool, float, np.ndarray]:
    return in_shared_memory(array), float(array.sum()), array * 2


async def test_large_arrays_travel_through_shared_memory(processes: WorkerPool) -> None:
    before = shm_segments()  # other tests' dropped batches may still be finishing
    big = [(k, np.full((256, 256), k, np.float32)) for k in range(5)]
    small = [(k, np.full(4, k, np.float32)) for k in range(5)]
    results = await processes.run_batch(array_facts, big)
    for k, (owned, total, doubled) in enumerate(results):
        assert owned  # a view of the segment in the worker, not an unpickled copy
        assert total == k * 256 * 256
        assert in_shared_memory(doubled)  # a view here too
        np.testing.assert_array_equal(doubled, np.full((256, 256), 2 * k, np.float32))
        doubled += 1  # writable
    # Small arrays travel inside the pickle.
    assert [r[0] for r in await processes.run_batch(array_facts, small)] == [False] * 5
    await wait_until(lambda: not shm_segments() - before)


async def test_no_segment_is_left_when_a_batch_is_left_early(
    processes: WorkerPool, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    before = shm_segments()

    def slow_array(key: int, array: np.ndarray) -> np.ndarray:
        wait_for_file(key, str(gate))
        return array + 1

    task = asyncio.create_task(
        processes.run_batch(slow_array, [(k, np.zeros(100_000)) for k in range(4)])
    )
    await wait_until(lambda: any(c.progress()[0] >= 0 for c in processes._in_flight))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.touch()
    assert await processes.run_batch(scale, [(1, 1), (2, 2)]) == [1, 4]
    await wait_until(lambda: not shm_segments() - before)


# -- closing ------------------------------------------------------------------


async def test_aclose_ends_the_worker_processes_and_a_later_call_starts_again() -> None:
    pool = WorkerPool("process", 2)
    pids = set(await pool.run_batch(pid_of, [(k, None) for k in range(6)]))
    assert pids
    assert all(psutil.pid_exists(p) for p in pids)
    await pool.aclose()
    assert not any(psutil.pid_exists(p) for p in pids)
    again = set(await pool.run_batch(pid_of, [(k, None) for k in range(6)]))
    assert again
    assert not again & pids
    pool.close()


def test_worker_processes_end_at_exit() -> None:
    code = (
        "import os\n"
        "from mlworkflow_async._core._executors import WorkerPool\n"
        "if __name__ == '__main__':\n"
        "    import asyncio\n"
        "    pool = WorkerPool('process', 2)\n"
        "    pids = asyncio.run(pool.run_batch(lambda k, v: os.getpid(), [(1, 0), (2, 0)]))\n"
        "    print(' '.join(map(str, set(pids))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert pids
    assert not any(psutil.pid_exists(p) for p in pids)


# -- arguments ------------------------------------------------------------------


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="workers must be an integer"):
        WorkerPool("thread", 0)
    with pytest.raises(ValueError, match="workers=2 needs executor="):
        worker_pool(None, 2)
    with pytest.raises(TypeError, match="executor must be None, 'thread', 'process'"):
        worker_pool("processes")
    with cf.ThreadPoolExecutor(1) as given, pytest.raises(ValueError, match="only sizes"):
        worker_pool(given, 3)
    assert worker_pool(None) is None


async def test_a_given_thread_pool_is_used_and_not_shut_down() -> None:
    with cf.ThreadPoolExecutor(3) as given:
        pool = worker_pool(given)
        assert pool is not None
        assert pool.in_threads
        names = await pool.run_batch(
            lambda k, v: threading.current_thread().name, [(k, 0) for k in range(6)]
        )
        assert threading.current_thread().name not in names
        await pool.aclose()
        assert given.submit(abs, -1).result() == 1


def test_a_pool_pickles_as_a_fresh_one() -> None:
    import pickle

    pool = WorkerPool("process", 3)
    copy = pickle.loads(pickle.dumps(pool))
    assert (copy.kind, copy.workers, copy._owned) == ("process", 3, None)
    with cf.ThreadPoolExecutor(1) as given:
        assert pickle.loads(pickle.dumps(worker_pool(given))) is None


async def test_side_runner_takes_the_same_executors() -> None:
    from mlworkflow_async import SideRunner

    base = 5
    async with SideRunner(2, executor="process") as runner:
        runner.run_async(lambda x: (x + base, os.getpid()), 1)
        runner.run_async(pid_of, 0, value=None)
        [(six, pid), other] = await runner.collect_runs()
        pool = runner._pool
    assert six == 6
    assert pid != os.getpid()
    assert other != os.getpid()
    assert pool is not None
    assert pool._owned is None  # closed with the block
    assert not psutil.pid_exists(pid)
    async with SideRunner(3, executor="thread") as runner:
        assert await runner.run_async(threading.current_thread) is not threading.current_thread()


# -- a Dask cluster --------------------------------------------------------------


async def test_dask_keeps_order_and_runs_on_its_workers(dask_client: Any) -> None:
    pool = worker_pool(dask_client)
    assert pool is not None
    worker_pids = set(dask_client.run(os.getpid).values())
    offset = 7
    assert await pool.run_batch(lambda k, v: k * v + offset, [(k, 2) for k in range(9)]) == [
        2 * k + 7 for k in range(9)
    ]
    assert pool.workers == 2
    assert set(await pool.run_batch(pid_of, [(k, 0) for k in range(6)])) <= worker_pids

    async def later(key: int, value: int) -> int:
        await asyncio.sleep(0)
        return key

    assert await pool.run_batch(later, [(k, 0) for k in range(4)]) == [0, 1, 2, 3]


@pytest.mark.parametrize("given", ["client", "its executor"])
async def test_dask_failures_and_a_killed_worker(dask_client: Any, given: str) -> None:
    pool = worker_pool(dask_client if given == "client" else dask_client.get_executor())
    assert pool is not None
    with pytest.raises(ValueError, match="no 2") as info:
        await pool.run_batch(fail_on_2, [(k, k) for k in range(4)])
    assert "fail_on_2" in str(info.value.__cause__)
    with pytest.raises(WorkerDiedError, match="die_on_3 on key"):
        await pool.run_batch(die_on_3, [(k, k) for k in range(4)], keys=list(range(4)))
    # The nanny starts the worker again: the cluster goes on.
    dask_client.wait_for_workers(2, timeout=30)
    assert await pool.run_batch(scale, [(k, 3) for k in range(4)]) == [0, 3, 6, 9]


async def test_combinators_on_a_dask_cluster(dask_client: Any) -> None:
    from mlworkflow_async import DictDataset, FilteredDataset, TransformedDataset

    parent = DictDataset({k: k for k in range(40)})
    kept = FilteredDataset(parent, lambda k, v: v % 4 == 0, executor=dask_client)
    on_cluster = TransformedDataset(kept, [lambda k, v: (v, os.getpid())], executor=dask_client)
    results = [
        item async for _, batch in on_cluster.batches(4, collate_fn=list) for item in batch
    ]
    assert [v for v, _ in results] == list(range(0, 40, 4))
    assert os.getpid() not in {pid for _, pid in results}
    await on_cluster.aclose()
    assert dask_client.status == "running"  # the client is its owner's to close


async def test_a_batch_arriving_while_every_worker_is_busy_goes_whole(tmp_path: Path) -> None:
    # Worker processes pay a cost per chunk: a batch that finds every worker
    # busy goes whole; threads pay none, and split every batch over all.
    processes, threads = WorkerPool("process", 2), WorkerPool("thread", 2)
    gate = tmp_path / "gate"
    try:
        for pool, parts in ((processes, 1), (threads, 2)):
            gate.unlink(missing_ok=True)
            first = asyncio.create_task(
                pool.run_batch(wait_for_file, [(k, str(gate)) for k in range(4)])
            )
            await wait_until(lambda pool=pool: len(pool._in_flight) == 2, timeout=30)
            second = asyncio.create_task(
                pool.run_batch(wait_for_file, [(k, str(gate)) for k in range(4, 8)])
            )
            await wait_until(lambda pool=pool, parts=parts: len(pool._in_flight) == 2 + parts)
            gate.touch()
            assert await first == [0, 1, 2, 3]
            assert await second == [4, 5, 6, 7]
    finally:
        gate.touch()
        processes.close()
        threads.close()


def test_a_stage_in_a_pool_fetches_a_batch_ahead_per_worker() -> None:
    from mlworkflow_async import DictDataset, TransformedDataset

    base = DictDataset({i: i for i in range(10)})
    pooled = TransformedDataset(base, [lambda k, v: v], executor="thread", workers=3)
    assert base._batches_ahead() == 2
    assert pooled._batches_ahead() == 5  # a batch queued per worker, one in use, one loading
    assert TransformedDataset(pooled, [lambda k, v: v])._batches_ahead() == 5  # inherited
