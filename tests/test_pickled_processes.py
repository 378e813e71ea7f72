"""An open PickledDataset crosses process boundaries: pickled to workers, or forked."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import pickle
import random
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mlworkflow_async import DictDataset, PickledDataset

from ._pickled_util import Key, assert_same, read_keys, small_items

ITEMS = small_items(60)
ITEMS[Key("big", 0)] = {"x": np.arange(300_000, dtype=np.float64)}  # mapped, not copied
KEYS = list(ITEMS)
REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def dataset_file(tmp_path: Path) -> Path:
    path = tmp_path / "shared.pkl"
    asyncio.run(PickledDataset.create(DictDataset(ITEMS), path))
    return path


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_process_pool_workers_reopen_the_file(dataset_file: Path, method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    context = multiprocessing.get_context(method)
    chunks = [KEYS[::2], KEYS[1::2]]
    with PickledDataset(dataset_file, mmap=True) as ds, ProcessPoolExecutor(
        1, mp_context=context
    ) as pool:
        results = list(pool.map(read_keys, [ds, ds], chunks))
    for chunk, got in zip(chunks, results, strict=True):
        for key, item in zip(chunk, got, strict=True):
            assert_same(ITEMS[key], item)


async def test_pickling_keeps_the_options(dataset_file: Path) -> None:
    with PickledDataset(dataset_file, mmap=True, safe=True, allow=[Key]) as ds:
        copy = pickle.loads(pickle.dumps(ds))
    with copy:
        assert copy.path == str(dataset_file)
        assert copy._options == {"mmap": True, "safe": True, "allow": (Key,), "verify": "all"}
        big = await copy.query_item(Key("big", 0))
        assert not big["x"].flags.writeable  # a view of the map, as in the original
        assert_same(ITEMS[Key("k", 3)], await copy.query_item(Key("k", 3)))


FORKING = textwrap.dedent(
    """
    import asyncio, json, os, pickle, signal, sys, threading
    sys.path.insert(0, {repo!r})
    from mlworkflow_async import PickledDataset
    from tests._pickled_util import assert_same
    from tests.test_pickled_processes import ITEMS, KEYS

    ds = PickledDataset({path!r}, mmap={use_mmap!r})
    untouched = PickledDataset({path!r})  # not used in the child, only closed there
    assert_same(ITEMS[KEYS[-1]], asyncio.run(ds.query_item(KEYS[-1])))  # used before the fork
    # Fork only once this process is down to one thread, as forking requires.
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(10)
    parent_fd = ds._reader._handle.fd
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(30)  # never outlive the test
            os.close(read_end)
            items = asyncio.run(ds.query_items(KEYS[::-1]))
            for key, item in zip(KEYS[::-1], items, strict=True):
                assert_same(ITEMS[key], item)
            child_fd = ds._reader._handle.fd
            ds.close()
            untouched.close()
            os.write(write_end, pickle.dumps((child_fd, ds.closed and untouched.closed)))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    child_fd, closed = pickle.loads(report) if report else (None, False)
    # The parent is unaffected by the child's reopening and exit.
    for key, item in zip(KEYS, asyncio.run(ds.query_items(KEYS)), strict=True):
        assert_same(ITEMS[key], item)
    assert_same(ITEMS[KEYS[5]], asyncio.run(untouched.query_item(KEYS[5])))
    print(json.dumps({{"status": status, "parent_fd": parent_fd, "child_fd": child_fd,
                      "closed": closed, "fd_after": ds._reader._handle.fd}}))
    """
)


@pytest.mark.parametrize("use_mmap", [False, True])
def test_forked_child_reads_with_its_own_descriptor(dataset_file: Path, use_mmap: bool) -> None:
    # Forked from a fresh process: forking this one, with whatever threads
    # other tests left running, could deadlock the child on their locks.
    code = FORKING.format(repo=REPO, path=str(dataset_file), use_mmap=use_mmap)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == 0  # the child read every item correctly
    assert report["closed"]
    assert report["child_fd"] != report["parent_fd"]  # the child reopened the file
    assert report["fd_after"] == report["parent_fd"]


MAP_STYLE = textwrap.dedent(
    """
    import multiprocessing, sys
    sys.path.insert(0, {repo!r})
    from mlworkflow_async import PickledDataset
    from tests._pickled_util import assert_same
    from tests.test_pickled_processes import ITEMS, KEYS

    ds = PickledDataset({path!r})

    def getitem(index):  # what a map-style dataset's __getitem__ does
        return ds.sync.query_item(KEYS[index])

    getitem(0)  # read in the parent first, as a script does before its loader forks
    with multiprocessing.get_context("fork").Pool(2) as pool:
        items = pool.map(getitem, range(len(KEYS))[::-1])
    for index, item in zip(range(len(KEYS))[::-1], items, strict=True):
        assert_same(ITEMS[KEYS[index]], item)
    print("ok")
    """
)


def test_forked_workers_read_through_the_blocking_view(dataset_file: Path) -> None:
    # A DataLoader's forked workers calling ds.sync.query_item: each reads on its
    # own thread with its own descriptor, and no event loop is started anywhere.
    code = MAP_STYLE.format(repo=REPO, path=str(dataset_file))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]


def test_threads_share_the_blocking_reads_of_one_file(dataset_file: Path) -> None:
    # Threads reading one open file through ds.sync at once, until it is closed
    # under them: every item read is right, and the reads after the close say so.
    with PickledDataset(dataset_file) as ds:
        read_some = threading.Barrier(5)
        closed = threading.Event()
        failures: list[BaseException] = []
        after_close: list[str] = []

        def reader(seed: int) -> None:
            order = random.Random(seed).sample(KEYS, len(KEYS))
            try:
                for key in order:
                    assert_same(ITEMS[key], ds.sync.query_item(key))
                read_some.wait(30)
                closed.wait(30)
                ds.sync.query_item(order[0])
            except ValueError as exc:
                after_close.append(str(exc))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        read_some.wait(30)
        ds.close()
        closed.set()
        for thread in threads:
            thread.join(30)
    assert not failures
    assert len(after_close) == 4
    assert all("is closed" in message for message in after_close)
