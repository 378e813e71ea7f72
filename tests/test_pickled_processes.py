"""An open PickledDataset crosses process boundaries: pickled to workers, or forked."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mlworkflow_async import DictDataset, PickledDataset

from ._pickled_util import Key, assert_same, read_keys, small_items

ITEMS = small_items(60)
ITEMS[Key("big", 0)] = {"x": np.arange(300_000, dtype=np.float64)}  # mapped, not copied
KEYS = list(ITEMS)


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
        assert copy._options == {"mmap": True, "safe": True, "allow": (Key,)}
        big = await copy.query_item(Key("big", 0))
        assert not big["x"].flags.writeable  # a view of the map, as in the original
        assert_same(ITEMS[Key("k", 3)], await copy.query_item(Key("k", 3)))


@pytest.mark.parametrize("use_mmap", [False, True])
def test_forked_child_reads_with_its_own_descriptor(dataset_file: Path, use_mmap: bool) -> None:
    ds = PickledDataset(dataset_file, mmap=use_mmap)
    assert_same(ITEMS[KEYS[0]], asyncio.run(ds.query_item(KEYS[0])))  # used before the fork
    parent_fd = ds._reader._handle.fd
    untouched = PickledDataset(dataset_file)  # not used in the child, only closed there
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any cleanup
        code = 1
        try:
            os.close(read_end)
            items = asyncio.run(ds.query_items(KEYS[::-1]))
            same = True
            for key, item in zip(KEYS[::-1], items, strict=True):
                try:
                    assert_same(ITEMS[key], item)
                except AssertionError:
                    same = False
            child_fd = ds._reader._handle.fd
            ds.close()
            untouched.close()
            report = pickle.dumps((same, child_fd, ds.closed and untouched.closed))
            os.write(write_end, report)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    same, child_fd, closed = pickle.loads(report)
    assert same
    assert closed
    assert child_fd != parent_fd  # the child reopened the file
    # The parent is unaffected by the child's reopening and exit.
    assert ds._reader._handle.fd == parent_fd
    for key, item in zip(KEYS, asyncio.run(ds.query_items(KEYS)), strict=True):
        assert_same(ITEMS[key], item)
    assert_same(ITEMS[KEYS[5]], asyncio.run(untouched.query_item(KEYS[5])))
    ds.close()
    untouched.close()
