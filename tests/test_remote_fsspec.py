"""PickledDataset files behind fsspec URLs: the in-memory filesystem and ``file://``."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from mlworkflow_async import PickledDataset
from mlworkflow_async.exceptions import (
    CorruptFileError,
    RemoteFileChangedError,
    RemoteFileError,
    RemoteFileNotFoundError,
)

from ._pickled_util import Key, assert_same, small_items, write_file

N = 500


@pytest.fixture(scope="module")
def local_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fsspec") / "small.pkl"
    write_file(path, small_items(N), context={"about": "fsspec"})
    return path


@pytest.fixture
def memory_url(local_file: Path) -> Iterator[str]:
    path = f"/tests-{uuid.uuid4().hex}/small.pkl"
    memory = fsspec.filesystem("memory")
    memory.pipe_file(path, local_file.read_bytes())
    yield f"memory://{path}"
    memory.rm(path)


async def _check_everything(ds: PickledDataset) -> None:
    expected = small_items(N)
    assert list(ds.yield_keys()) == list(expected)
    assert ds.context == {"about": "fsspec"}
    keys = list(expected)
    random.Random(0).shuffle(keys)
    async for batch_keys, batch in ds.batches(64, keys):
        assert_same(batch["y"], np.array([k.index for k in batch_keys]))
    assert_same(await ds.query_item(Key("k", 3)), expected[Key("k", 3)])


async def test_the_in_memory_filesystem(memory_url: str) -> None:
    async with await PickledDataset.open(memory_url) as ds:
        await _check_everything(ds)


async def test_file_urls(local_file: Path) -> None:
    async with await PickledDataset.open(local_file.as_uri()) as ds:
        await _check_everything(ds)


async def test_requests_opening_and_for_one_batch(memory_url: str) -> None:
    async with await PickledDataset.open(memory_url, tail=4096, gap=1024) as ds:
        stats: Any = ds._reader.source.stats  # type: ignore[union-attr]
        opening = stats.requests
        await ds.query_items([Key("k", i) for i in range(64)])
        batch = stats.requests - opening
    # The end of the file (its footer copies the header), then the index.
    assert opening <= 2
    assert batch == 1


async def test_with_a_cache(memory_url: str, tmp_path: Path) -> None:
    async with await PickledDataset.open(memory_url, cache_dir=tmp_path, tail=16) as ds:
        await _check_everything(ds)
        stats: Any = ds._reader.source.stats  # type: ignore[union-attr]
        before = stats.requests
        await _check_everything(ds)
        assert stats.requests == before


async def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RemoteFileNotFoundError, match="does not exist"):
        await PickledDataset.open("memory://nowhere/absent.pkl")
    with pytest.raises(RemoteFileNotFoundError):
        await PickledDataset.open((tmp_path / "absent.pkl").as_uri())


async def test_an_unknown_protocol() -> None:
    with pytest.raises(RemoteFileError, match="nosuchprotocol"):
        await PickledDataset.open("nosuchprotocol://bucket/d.pkl")


async def test_a_file_cut_short_while_open(memory_url: str) -> None:
    memory = fsspec.filesystem("memory")
    path = memory_url.removeprefix("memory://")
    async with await PickledDataset.open(memory_url, tail=16) as ds:
        memory.pipe_file(path, memory.cat_file(path)[:5000])
        with pytest.raises(RemoteFileChangedError, match="changed while it was open"):
            await ds.query_item(Key("k", N - 1))


async def test_a_damaged_file(tmp_path: Path) -> None:
    memory = fsspec.filesystem("memory")
    path = f"/tests-{uuid.uuid4().hex}/junk.pkl"
    memory.pipe_file(path, b"\x89MLWDS\r\n" + bytes(100))
    try:
        with pytest.raises(CorruptFileError):
            await PickledDataset.open(f"memory://{path}")
    finally:
        memory.rm(path)


def test_info_and_verify(memory_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from mlworkflow_async.__main__ import main

    assert main(["info", memory_url]) == 0
    assert f"items:   {N}" in capsys.readouterr().out
    assert main(["verify", memory_url]) == 0
    assert f"OK: all {N} items" in capsys.readouterr().out
