"""The keys of a format 2 file are unpickled in worker threads, never on the event loop.

Unpickling 500k string keys takes about half a second: done on the loop at
the first ``batches()`` call, it would stall every other task.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlworkflow_async import DictDataset, PickledDataset
from mlworkflow_async._store import _file_keys

from ._pickled_util import Key

KEYS: list[Any] = [f"key {i}" for i in range(5000)] + [Key("k", i) for i in range(3000)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    target = tmp_path / "keys.pkl"
    asyncio.run(PickledDataset.create(DictDataset({key: i for i, key in enumerate(KEYS)}), target))
    return target


class Recorder:
    """Stands for the index's loads: notes the thread of each key unpickled."""

    def __init__(self, loads: Callable[..., Any]) -> None:
        self.loads = loads
        self.threads: set[int] = set()

    def __call__(self, data: Any) -> Any:
        self.threads.add(threading.get_ident())
        return self.loads(data)


async def read_keys(ds: PickledDataset, how: str) -> list[Any]:
    if how == "batches":
        return [key async for keys, _ in ds.batches(500) for key in keys]
    if how == "shuffled batches":
        return sorted(
            [key async for keys, _ in ds.batches(500, shuffle=3) for key in keys], key=KEYS.index
        )
    if how == "all":
        return await ds.keys.all()
    return [key async for key in ds.keys]


@pytest.mark.parametrize("how", ["batches", "shuffled batches", "all", "async for"])
def test_keys_are_unpickled_off_the_loop(
    path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_file_keys, "CHUNK", 1000)  # several chunks, each a thread call

    async def main() -> None:
        async with await PickledDataset.open(path) as ds:
            recorder = Recorder(ds._reader.index._loads)
            ds._reader.index._loads = recorder
            got = await read_keys(ds, how)
            assert recorder.threads  # they were unpickled now...
            assert threading.get_ident() not in recorder.threads  # ...not on the loop
            assert got == KEYS
            assert ds.keys.known == tuple(KEYS)

    asyncio.run(main())


def test_other_tasks_run_while_the_keys_are_unpickled(path: Path) -> None:
    # The first key unpickled waits for another task to run: were it unpickled
    # on the loop, that task could not (the wait's timeout only guards a hang).
    released = threading.Event()

    async def main() -> None:
        async with await PickledDataset.open(path) as ds:
            loads = ds._reader.index._loads

            def waiting(data: Any) -> Any:
                assert released.wait(30), "the loop did not run while keys were unpickled"
                return loads(data)

            ds._reader.index._loads = waiting

            async def other() -> None:
                await asyncio.sleep(0)
                released.set()

            task = asyncio.create_task(other())
            assert await ds.keys.all() == KEYS
            await task

    asyncio.run(main())


def test_keys_are_known_at_once_to_blocking_readers(path: Path) -> None:
    with PickledDataset(path) as ds:
        assert len(ds.keys) == len(KEYS)
        assert ds.keys.complete
        assert ds.keys.known == tuple(KEYS)  # unpickled here, on the calling thread
        assert ds.sync.keys.all() == KEYS


def test_concurrent_readers_share_one_unpickling(path: Path) -> None:
    async def main() -> None:
        async with await PickledDataset.open(path) as ds:
            calls = 0
            loads = ds._reader.index._loads

            def counted(data: Any) -> Any:
                nonlocal calls
                calls += 1
                return loads(data)

            ds._reader.index._loads = counted
            first, second = await asyncio.gather(ds.keys.all(), ds.keys.all())
            assert first == second == KEYS
            assert calls == len(KEYS)

    asyncio.run(main())


def test_the_key_sequence_pickles_with_its_keys(path: Path) -> None:
    with PickledDataset(path) as ds:
        copy = pickle.loads(pickle.dumps(ds.keys))
    assert copy.complete
    assert copy.known == tuple(KEYS)
