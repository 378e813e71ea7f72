"""The on-disk cache of fetched byte ranges (``cache_dir=``), against a real HTTP server."""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import DictDataset, PickledDataset

from ._pickled_util import Key, assert_same, small_items, write_file
from ._range_server import RangeServer, serve_folder

N = 800


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    write_file(root / "small.pkl", small_items(N))
    write_file(root / "other.pkl", small_items(300))
    big = {i: {"a": np.full(300_000, i, dtype=np.float64), "i": i} for i in range(4)}
    write_file(root / "arrays.pkl", big)
    return root


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[RangeServer]:
    with serve_folder(str(folder)) as running:
        yield running


@pytest.fixture(autouse=True)
def no_faults(server: RangeServer) -> Iterator[None]:
    yield
    server.faults.fail_every = 0
    server.faults.reset()


def _cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.ranges"))


async def _epoch(ds: PickledDataset, seed: int) -> list[Any]:
    keys = list(ds.yield_keys())
    random.Random(seed).shuffle(keys)
    items = []
    async for _, batch in ds.batches(64, keys, collate_fn=list):
        items += batch
    return items


async def test_a_second_epoch_is_served_from_the_cache(server: RangeServer, tmp_path: Path) -> None:
    expected = small_items(N)
    async with await PickledDataset.open(server.url("small.pkl"), cache_dir=tmp_path) as ds:
        await _epoch(ds, 1)
        assert server.faults.ranged("small.pkl")
        server.faults.reset()
        server.faults.fail_every = 1  # any request would now fail
        items = await _epoch(ds, 2)
    keys = list(expected)
    random.Random(2).shuffle(keys)
    for key, item in zip(keys, items, strict=True):
        assert_same(item, expected[key])
    assert server.faults.requests == []


async def test_the_cache_is_reused_by_the_next_opening(server: RangeServer, tmp_path: Path) -> None:
    async with await PickledDataset.open(server.url("small.pkl"), cache_dir=tmp_path) as ds:
        await _epoch(ds, 1)
    server.faults.reset()
    async with await PickledDataset.open(server.url("small.pkl"), cache_dir=tmp_path) as ds:
        server.faults.fail_every = 1
        assert len(await _epoch(ds, 3)) == N
    assert len(server.faults.requests) == 1  # opening only
    assert len(_cache_files(tmp_path)) == 1


async def test_cached_bytes_are_fetched_by_whole_blocks(
    server: RangeServer, tmp_path: Path
) -> None:
    url = server.url("small.pkl")
    async with await PickledDataset.open(url, cache_dir=tmp_path, cache_block=4096) as ds:
        server.faults.reset()
        await ds.query_item(Key("k", 300))
        (header,) = server.faults.ranged("small.pkl")
    first, last = (int(x) for x in header.removeprefix("bytes=").split("-"))
    assert first % 4096 == 0
    assert (last + 1) % 4096 == 0


def _fill(url: str, cache_dir: str, seed: int) -> int:
    ds = PickledDataset(url, cache_dir=cache_dir, cache_block=4096, gap=0)
    keys = list(ds.yield_keys())
    random.Random(seed).shuffle(keys)
    with ds:
        for start in range(0, len(keys), 50):
            ds.sync.query_items(keys[start:start + 50])
    return len(keys)


def test_processes_filling_one_cache_at_once_leave_it_whole(
    server: RangeServer, tmp_path: Path
) -> None:
    url = server.url("small.pkl")
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        counts = pool.starmap(_fill, [(url, str(tmp_path), seed) for seed in (1, 2)])
    assert counts == [N, N]
    assert len(_cache_files(tmp_path)) == 1
    with PickledDataset(url, cache_dir=tmp_path, cache_block=4096) as ds:
        server.faults.fail_every = 1
        items = ds.sync.query_items(list(ds.yield_keys()))
    expected = small_items(N)
    for key, item in zip(expected, items, strict=True):
        assert_same(item, expected[key])


async def test_the_cache_folder_stays_within_its_bound(server: RangeServer, tmp_path: Path) -> None:
    async with await PickledDataset.open(
        server.url("small.pkl"), cache_dir=tmp_path, tail=16
    ) as ds:
        await _epoch(ds, 1)
    (first,) = _cache_files(tmp_path)
    os.utime(first, (1, 1))  # used long ago
    bound = first.stat().st_blocks * 512 + 16384  # no room for the other file as well
    async with await PickledDataset.open(
        server.url("other.pkl"), cache_dir=tmp_path, cache_size=bound, tail=16
    ) as other:
        await _epoch(other, 1)
    files = _cache_files(tmp_path)
    assert len(files) == 1
    assert first not in files
    assert sum(f.stat().st_blocks * 512 for f in files) <= bound


async def test_a_file_larger_than_the_bound_is_read_from_the_server(
    server: RangeServer, tmp_path: Path
) -> None:
    async with await PickledDataset.open(
        server.url("small.pkl"), cache_dir=tmp_path, cache_size=4096
    ) as ds:
        assert len(await _epoch(ds, 1)) == N
        server.faults.reset()
        assert len(await _epoch(ds, 2)) == N
        assert server.faults.requests  # not cached


async def test_a_range_larger_than_the_bound_is_not_stored(
    server: RangeServer, tmp_path: Path
) -> None:
    # One request fetches far more than the bound: none of it may be kept.
    async with await PickledDataset.open(
        server.url("small.pkl"), cache_dir=tmp_path, cache_size=4096, gap=1 << 30, tail=1024
    ) as ds:
        assert len(await _epoch(ds, 1)) == N
        (cache,) = _cache_files(tmp_path)
        stored = os.stat(cache).st_blocks * 512
    assert stored <= 4096 + os.statvfs(tmp_path).f_bsize  # the table of blocks at most


async def test_a_changed_file_gets_a_new_cache_file(
    server: RangeServer, folder: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    await PickledDataset.create(DictDataset({"a": 1}), tmp_path / "v1.pkl")
    os.replace(tmp_path / "v1.pkl", folder / "versioned.pkl")
    async with await PickledDataset.open(server.url("versioned.pkl"), cache_dir=cache) as ds:
        assert await ds.query_item("a") == 1
    await PickledDataset.create(DictDataset({"a": 2, "b": 3}), tmp_path / "v2.pkl")
    os.replace(tmp_path / "v2.pkl", folder / "versioned.pkl")
    async with await PickledDataset.open(server.url("versioned.pkl"), cache_dir=cache) as ds:
        assert await ds.query_item("a") == 2
    assert len(_cache_files(cache)) == 2


async def test_a_damaged_cache_file_is_filled_again(server: RangeServer, tmp_path: Path) -> None:
    url = server.url("small.pkl")
    async with await PickledDataset.open(url, cache_dir=tmp_path) as ds:
        await _epoch(ds, 1)
    (cached,) = _cache_files(tmp_path)
    os.truncate(cached, 1000)
    async with await PickledDataset.open(url, cache_dir=tmp_path) as ds:
        items = await _epoch(ds, 0)
    expected = small_items(N)
    keys = list(expected)
    random.Random(0).shuffle(keys)
    for key, item in zip(keys, items, strict=True):
        assert_same(item, expected[key])


async def test_mmap_maps_large_arrays_from_the_cache(server: RangeServer, tmp_path: Path) -> None:
    url = server.url("arrays.pkl")
    async with await PickledDataset.open(url, cache_dir=tmp_path, mmap=True) as ds:
        items = await ds.query_items([0, 2])
        again = await ds.query_item(2)
    for i, item in zip([0, 2], items, strict=True):
        assert not item["a"].flags.writeable  # a view of the cache file
        assert (item["a"] == i).all()
        assert item["i"] == i
    assert (again["a"] == 2).all()
