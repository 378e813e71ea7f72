"""CPU stages: combinators whose callables run in worker threads, processes or a cluster."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import psutil
import pytest

from mlworkflow_async import (
    AugmentedDataset,
    Dataset,
    DictDataset,
    FilteredDataset,
    TransformedDataset,
    WorkerDiedError,
)

from .conftest import block_until_exists, wait_until

EXECUTORS = [None, "thread", "process"]


def tenfold(key: int, item: int) -> int:
    return item * 10


def plus_key(key: int, item: int) -> int:
    return item + key


def even_item(key: int, item: int) -> bool:
    return item % 2 == 0


def fail_on_7(key: int, item: int) -> int:
    if key == 7:
        raise ValueError(f"cannot take {key}")
    return item


def die_on_9(key: int, item: int) -> int:
    if key == 9:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


class Pairs(AugmentedDataset[Any, Any]):
    """Two children per root; ``scale`` is set at construction and travels with augment."""

    def __init__(self, parent: Dataset[Any, Any], scale: int, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.scale = scale

    def augment(self, root_key: Any, root_item: Any) -> Iterator[tuple[Any, Any]]:
        yield (root_key, 0), (root_item * self.scale, os.getpid())
        yield (root_key, 1), (-root_item * self.scale, os.getpid())


class AsyncPairs(AugmentedDataset[Any, Any]):
    async def augment(self, root_key: Any, root_item: Any) -> AsyncIterator[tuple[Any, Any]]:
        await asyncio.sleep(0)
        yield (root_key, "a"), root_item
        yield (root_key, "b"), root_item + 0.5


async def collect(ds: Any, batch_size: int = 8, **kwargs: Any) -> list[Any]:
    return [item async for _, batch in ds.batches(batch_size, collate_fn=list, **kwargs)
            for item in batch]


@pytest.fixture(scope="module")
def parent() -> DictDataset[int, int]:
    return DictDataset({k: k for k in range(40)})


# -- the same results wherever callables run ------------------------------


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_transformed_keeps_order_wherever_it_runs(
    executor: str | None, parent: DictDataset[int, int]
) -> None:
    workers = 2 if executor else None
    async with TransformedDataset(
        parent, [tenfold, plus_key], executor=executor, workers=workers
    ) as ds:
        assert await collect(ds) == [11 * k for k in range(40)]
        assert await ds.query_items([5, 1]) == [55, 11]
        assert await ds.query_item(3) == 33
        # A second epoch reuses the pool.
        assert await collect(ds, batch_size=5) == [11 * k for k in range(40)]


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_filtered_pairs_wherever_they_run(
    executor: str | None, parent: DictDataset[int, int]
) -> None:
    async with FilteredDataset(parent, even_item, executor=executor) as ds:
        assert list(await ds.keys.all()) == list(range(0, 40, 2))
        assert await collect(ds) == list(range(0, 40, 2))
    numpy_bools = FilteredDataset(
        parent, lambda k, v: np.bool_(v < 3), executor="process", workers=1
    )
    async with numpy_bools:
        assert await collect(numpy_bools) == [0, 1, 2]


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_augmented_children_come_back(
    executor: str | None, parent: DictDataset[int, int]
) -> None:
    async with Pairs(parent, 3, executor=executor) as ds:
        keys = await ds.keys.all()
        assert list(keys[:4]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        items = await collect(ds)
        assert [value for value, _ in items] == [s * 3 * k for k in range(40) for s in (1, -1)]
        pids = {pid for _, pid in items}
        if executor == "process":
            assert os.getpid() not in pids
        else:
            assert pids == {os.getpid()}
        # Queried without discovery first: roots are fetched and augmented again.
        fresh = Pairs(parent, 2, executor=executor)
        assert [v for v, _ in await fresh.query_items([(4, 1), (2, 0)])] == [-8, 4]
        await fresh.aclose()


async def test_lambdas_closures_and_async_callables_in_processes(
    parent: DictDataset[int, int],
) -> None:
    offset = 1000

    async def shifted(key: int, item: int) -> int:
        await asyncio.sleep(0)
        return item + offset

    async with TransformedDataset(
        parent, [lambda k, v: v * 2, shifted, plus_key], executor="process", workers=2
    ) as ds:
        assert await collect(ds) == [3 * k + 1000 for k in range(40)]
    async with AsyncPairs(parent, executor="process", workers=2) as pairs:
        assert (await collect(pairs))[:4] == [0, 0.5, 1, 1.5]


async def test_mixed_steps_with_threads_run_async_ones_on_the_loop(
    parent: DictDataset[int, int],
) -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []

    def plain(key: int, item: int) -> int:
        seen.append(("plain", threading.get_ident() == loop_thread))
        return item + 1

    async def awaited(key: int, item: int) -> int:
        seen.append(("async", threading.get_ident() == loop_thread))
        return item * 2

    async with TransformedDataset(parent, [plain, awaited], executor="thread", workers=2) as ds:
        assert await ds.query_items([1, 2, 3]) == [4, 6, 8]
    assert {s for s in seen if s[0] == "plain"} == {("plain", False)}
    assert {s for s in seen if s[0] == "async"} == {("async", True)}


async def test_a_given_executor_is_used_and_left_open(parent: DictDataset[int, int]) -> None:
    with cf.ThreadPoolExecutor(2) as given:
        ds = TransformedDataset(parent, [tenfold], executor=given)
        assert await collect(ds) == [10 * k for k in range(40)]
        await ds.aclose()
        assert given.submit(abs, -2).result() == 2  # not ours to shut down


# -- bounds, early exit, failures ------------------------------------------


class Probe(Dataset[int, int]):
    """Counts fetches in flight."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.active = self.max_active = 0

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> int:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(0)
            return key
        finally:
            self.active -= 1


@pytest.mark.parametrize("executor", ["thread", "process", "dask"])
async def test_the_stream_bound_holds(executor: str, request: pytest.FixtureRequest) -> None:
    probe = Probe(120)
    where: Any = executor
    workers: int | None = 2
    if executor == "dask":
        where, workers = request.getfixturevalue("dask_client"), None
    async with TransformedDataset(probe, [tenfold], executor=where, workers=workers) as ds:
        assert await collect(ds, batch_size=6, concurrency=12) == [10 * k for k in range(120)]
    assert 1 <= probe.max_active <= 12


async def test_leaving_a_stream_early_cancels_queued_work(parent: DictDataset[int, int]) -> None:
    gate = threading.Event()
    calls: list[int] = []

    def held(key: int, item: int) -> int:
        calls.append(key)
        assert gate.wait(10)
        return item

    ds = TransformedDataset(parent, [held], executor="thread", workers=1)
    stream = ds.batches(4, collate_fn=list, concurrency=16)
    first = asyncio.create_task(stream.__anext__())
    await wait_until(lambda: len(calls) == 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await stream.aclose()
    gate.set()
    await ds.aclose()  # waits for the item running
    # The running chunk stopped after its item; the chunks queued never ran.
    assert calls == [0]


def started_then_wait(key: int, folder: str) -> int:
    """Mark ``key`` as started, then wait (bounded) for the file ``gate`` in ``folder``."""
    open(os.path.join(folder, f"started-{key}"), "w").close()
    block_until_exists(os.path.join(folder, "gate"))
    return key


def started_in(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("started-*")}


def tasks_on_workers(dask_worker: Any) -> list[str]:
    """The states of the tasks a Dask worker still holds (run there by ``Client.run``)."""
    return [task.state for task in dask_worker.state.tasks.values()]


async def until_workers_hold(client: Any, allowed: set[str]) -> None:
    """Wait (bounded) until every task on the workers is in one of the ``allowed`` states."""
    with anyio.fail_after(30):
        while True:
            held = await anyio.to_thread.run_sync(client.run, tasks_on_workers)
            if all(state in allowed for states in held.values() for state in states):
                return
            await anyio.sleep(0.005)


@pytest.mark.parametrize("given", ["client", "its executor"])
async def test_leaving_a_stream_early_on_a_dask_cluster_drops_queued_work(
    tmp_path: Path, dask_client: Any, given: str
) -> None:
    distributed = pytest.importorskip("distributed")
    loop_thread = threading.get_ident()
    cancels: list[tuple[int, int]] = []

    class Recording(distributed.Client):  # type: ignore[misc]
        """A real client that notes where each cancel message is sent from."""

        def cancel(self, futures: Any, *args: Any, **kwargs: Any) -> Any:
            cancels.append((threading.get_ident(), len(futures)))
            return super().cancel(futures, *args, **kwargs)

    client = await anyio.to_thread.run_sync(
        lambda: Recording(dask_client.scheduler.address, set_as_default=False)
    )
    try:
        parent = DictDataset({k: str(tmp_path) for k in range(40)})
        executor = client if given == "client" else client.get_executor(pure=False)
        ds = TransformedDataset(parent, [started_then_wait], executor=executor)
        stream = ds.batches(2, collate_fn=list, concurrency=16)
        first = asyncio.create_task(stream.__anext__())
        # Every batch the stream may hold ahead is submitted: 2 chunks for the
        # first (one per worker), then whole batches while the workers are busy.
        await wait_until(lambda: len(client.futures) >= 9, timeout=30)
        await wait_until(lambda: any(tmp_path.glob("started-*")), timeout=30)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await stream.aclose()
        # The workers drop what they held queued as soon as they hear of the
        # cancel; the chunks already running cannot be stopped.
        await until_workers_hold(client, {"cancelled", "memory", "released"})
        running = started_in(tmp_path)
        (tmp_path / "gate").touch()
        await ds.aclose()
        await until_workers_hold(client, set())
    finally:
        await anyio.to_thread.run_sync(client.close)
    started = started_in(tmp_path)
    # Sixteen keys were in flight over two single-threaded workers: only the
    # two running chunks (of at most two keys each) ever started.
    assert 1 <= len(running) <= 2, sorted(running)
    assert len(started) <= 4, sorted(started)
    # Nothing was cancelled from the loop: Dask's cancel waits for the scheduler.
    assert {thread for thread, _ in cancels}.isdisjoint({loop_thread}), cancels
    # The client itself: all of it in one cancel message; its executor: one a future.
    counts = [count for _, count in cancels]
    assert counts == ([9] if given == "client" else [1] * 9)


async def test_a_dask_stream_left_after_the_default_executor_shut_down(
    dask_client: Any,
) -> None:
    # As when asyncio.run ends: the loop's default executor is gone, and the
    # cancel message must still go out without hanging the stream's close.
    parent = DictDataset({k: k for k in range(200)})
    ds = TransformedDataset(parent, [tenfold], executor=dask_client)
    stream = ds.batches(2, collate_fn=list, concurrency=32)
    assert await stream.__anext__() == ([0, 1], [0, 10])
    await asyncio.get_running_loop().shutdown_default_executor()
    with anyio.fail_after(30):
        await stream.aclose()
        await ds.aclose()
        while any((await anyio.to_thread.run_sync(dask_client.processing)).values()):
            await anyio.sleep(0.01)


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_a_failure_names_key_and_transform_with_the_worker_traceback(
    executor: str, parent: DictDataset[int, int]
) -> None:
    async with TransformedDataset(parent, [tenfold, fail_on_7], executor=executor) as ds:
        with pytest.raises(ValueError, match="cannot take 7") as info:
            await collect(ds)
        notes = "\n".join(info.value.__notes__)
        assert "raised by transform fail_on_7" in notes
        assert "key 7" in notes
        if executor == "process":
            assert "fail_on_7" in str(info.value.__cause__)
        assert await ds.query_items([1]) == [10]  # the pool goes on


async def test_a_failing_predicate_and_augment_in_processes(
    parent: DictDataset[int, int],
) -> None:
    def judge(key: int, item: int) -> bool:
        if key == 5:
            raise LookupError("no verdict")
        return True

    async with FilteredDataset(parent, judge, executor="process", workers=2) as ds:
        with pytest.raises(LookupError) as info:
            await ds.keys.all()
        assert "key 5" in "\n".join(info.value.__notes__)

    class Broken(AugmentedDataset[Any, Any]):
        def augment(self, root_key: Any, root_item: Any) -> Any:
            if root_key == 3:
                raise KeyError("no children")
            yield (root_key, 0), root_item

    async with Broken(parent, executor="process", workers=2) as broken:
        with pytest.raises(KeyError) as error:
            await broken.keys.all()
        assert "root key 3" in "\n".join(error.value.__notes__)


async def test_a_killed_worker_names_the_key_and_the_next_stream_works(
    parent: DictDataset[int, int],
) -> None:
    async with TransformedDataset(parent, [die_on_9], executor="process", workers=2) as ds:
        with pytest.raises(WorkerDiedError, match=r"die_on_9 on key 9"):
            await collect(ds)
        survivors = TransformedDataset(parent, [tenfold], executor=ds._pool)
        assert await collect(survivors) == [10 * k for k in range(40)]


async def test_aclose_closes_the_pools_of_the_whole_chain(parent: DictDataset[int, int]) -> None:
    inner = FilteredDataset(parent, even_item, executor="process", workers=1)
    outer = TransformedDataset(inner, [lambda k, v: os.getpid()], executor="process", workers=1)
    async with outer:
        pids = set(await collect(outer))
        assert os.getpid() not in pids
        assert all(psutil.pid_exists(pid) for pid in pids)
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert inner._pool is not None
    assert inner._pool._owned is None
