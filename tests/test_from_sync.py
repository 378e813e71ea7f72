"""from_sync: blocking datasets, the original mlworkflow's included, used asynchronously."""

from __future__ import annotations

import asyncio
import threading
import time

import mlworkflow
import pytest

from mlworkflow_async import from_sync
from tests.conftest import wait_until


async def test_real_mlworkflow_dict_dataset() -> None:
    legacy = mlworkflow.DictDataset({i: {"x": float(i)} for i in range(3000)})
    ds = from_sync(legacy)
    keys = await ds.keys.all()
    assert keys == list(range(3000))
    assert len(ds) == 3000
    assert await ds.query_item(7) == {"x": 7.0}
    total = [b["x"].sum() async for _, b in ds.batches(500, concurrency=8)]
    assert sum(total) == sum(range(3000))


async def test_blocking_calls_run_in_threads_bounded_by_the_limiter() -> None:
    loop_thread = threading.get_ident()
    lock = threading.Lock()
    state = {"active": 0, "max": 0, "threads": set()}
    release = threading.Event()

    class Legacy:
        def yield_keys(self) -> list[int]:
            return list(range(12))

        def query_item(self, key: int) -> int:
            with lock:
                state["active"] += 1
                state["max"] = max(state["max"], state["active"])
                state["threads"].add(threading.get_ident())
            release.wait(10)
            with lock:
                state["active"] -= 1
            return key

    ds = from_sync(Legacy(), limiter=3)
    task = asyncio.create_task(ds.query_items(list(range(12))))
    await wait_until(lambda: state["active"] == 3)
    # The loop is not blocked while three threads wait.
    await asyncio.sleep(0.01)
    assert state["active"] == 3
    release.set()
    assert await task == list(range(12))
    assert state["max"] == 3
    assert loop_thread not in state["threads"]


def test_from_sync_across_loops_and_the_sync_view() -> None:
    ds = from_sync(mlworkflow.DictDataset({"a": 1, "b": 2}), limiter=2)
    assert asyncio.run(ds.query_item("a")) == 1
    assert asyncio.run(ds.query_item("b")) == 2
    assert ds.sync.keys.all() == ["a", "b"]


async def test_errors_of_the_wrapped_dataset_propagate() -> None:
    class Legacy:
        def yield_keys(self) -> list[int]:
            return [1]

        def query_item(self, key: int) -> int:
            time.sleep(0)
            raise LookupError(f"no {key}")

    with pytest.raises(LookupError, match="no 1"):
        await from_sync(Legacy()).query_item(1)
