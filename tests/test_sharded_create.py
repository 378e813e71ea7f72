"""PickledDataset.create(..., shards=N, client=...) on a real Dask cluster, a process pool, here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, LocalCluster

from mlworkflow_async import (
    DictDataset,
    PickledDataset,
    UnpicklableSourceError,
    WorkerLostError,
)
from mlworkflow_async._store._sharded import file_digest

from ._pickled_util import Gated, assert_same, leftovers
from ._sharded_sources import Fails, HoldsLock, KillsItsWorker, Numbers, item
from .conftest import wait_until

N = 400


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # A task whose worker dies fails at once, rather than being retried elsewhere.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as client:
        yield client


def manifest(folder: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((folder / "manifest.json").read_bytes())
    return document


async def check_items(folder: Path, n: int, shards: int) -> None:
    """The folder reads as ``Numbers(n)``, from ``shards`` files its manifest describes."""
    document = manifest(folder)
    assert document["version"] == 1
    assert document["items"] == n
    assert len(document["shards"]) == shards
    for shard in document["shards"]:
        size, digest = file_digest(str(folder / shard["file"]))
        assert (shard["size"], shard["sha256"]) == (size, digest)
    assert sorted(os.listdir(folder)) == sorted(
        ["manifest.json", *(shard["file"] for shard in document["shards"])]
    )
    async with await PickledDataset.open(folder) as ds:
        assert list(ds.yield_keys()) == list(range(n))
        assert [count for _, count in ds.shard_groups()] == [s["items"] for s in document["shards"]]
        assert ds.context == {"made_by": "Numbers", "n": n}
        got = await ds.query_items(list(range(n)))
        for key, value in zip(range(n), got, strict=True):
            assert_same(value, item(key))


async def test_items_equal_the_source_on_the_cluster(client: Client, tmp_path: Path) -> None:
    folder = tmp_path / "set"
    assert await PickledDataset.create(Numbers(N), folder, shards=4, client=client) == N
    await check_items(folder, N, 4)
    assert [s["items"] for s in manifest(folder)["shards"]] == [100, 100, 100, 100]


async def test_an_asynchronous_client_works_too(cluster: LocalCluster, tmp_path: Path) -> None:
    folder = tmp_path / "set"
    async with Client(cluster.scheduler_address, asynchronous=True) as client:
        assert await PickledDataset.create(Numbers(N), folder, shards=3, client=client) == N
    await check_items(folder, N, 3)


async def test_progress_counts_the_items_of_every_worker(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tqdm

    updates: list[int] = []

    class Recorded(tqdm.tqdm):  # type: ignore[misc,type-arg]
        def update(self, n: float | None = 1) -> bool | None:
            updates.append(int(n or 0))
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    await PickledDataset.create(Numbers(N), tmp_path / "set", shards=4, client=client,
                                progress=True, concurrency=50)
    assert sum(updates) == N
    # Each shard reports each chunk it fetched (50 keys), from both workers.
    assert len([n for n in updates if n]) > 4


async def test_a_killed_worker_is_a_clear_error_and_the_previous_set_stays(
    client: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "set"
    await PickledDataset.create(Numbers(N), folder, shards=2, client=client)
    before = (folder / "manifest.json").read_bytes()
    old_files = sorted(os.listdir(folder))

    lost = r"died while it held shard \d \(shard-.*, 100 keys\)"
    with pytest.raises(WorkerLostError, match=lost):
        await PickledDataset.create(KillsItsWorker(N, at=250), folder, shards=4, client=client)

    assert (folder / "manifest.json").read_bytes() == before
    assert set(old_files) <= set(os.listdir(folder))
    await check_items_subset(folder, old_files)
    async with await PickledDataset.open(folder) as ds:
        assert len(ds) == N
        assert_same(await ds.query_item(250), item(250))
    # The next run that succeeds deletes whatever the failed one left.
    await PickledDataset.create(Numbers(N), folder, shards=2, client=client)
    await check_items(folder, N, 2)


async def check_items_subset(folder: Path, old_files: list[str]) -> None:
    """Only files of the failed run may be left beside the old ones, none of them listed."""
    listed = {s["file"] for s in manifest(folder)["shards"]}
    extra = set(os.listdir(folder)) - set(old_files)
    assert not extra & listed


async def test_an_error_in_the_source_names_its_shard(client: Client, tmp_path: Path) -> None:
    folder = tmp_path / "set"
    await PickledDataset.create(Numbers(10), folder, shards=1)
    before = (folder / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="no item 123 today") as info:
        await PickledDataset.create(Fails(N, at=123), folder, shards=4, client=client)
    assert any("shard 1 (" in note for note in info.value.__notes__)
    assert (folder / "manifest.json").read_bytes() == before
    async with await PickledDataset.open(folder) as ds:
        assert len(ds) == 10


@pytest.mark.parametrize("where", ["dask", "process"])
async def test_a_source_that_cannot_be_pickled_fails_before_any_work(
    where: str, client: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "set"
    with pytest.raises(UnpicklableSourceError) as info:
        await PickledDataset.create(
            HoldsLock(N), folder, shards=2, client=client if where == "dask" else "process"
        )
    message = str(info.value)
    assert "dataset.backend['primary'].lock" in message
    assert "_thread.lock" in message
    assert not folder.exists()  # nothing was started, not even the folder


async def test_a_local_process_pool(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    assert await PickledDataset.create(Numbers(N), folder, shards=3, client="process") == N
    await check_items(folder, N, 3)
    before = (folder / "manifest.json").read_bytes()
    with pytest.raises(WorkerLostError, match="died while it held shard"):
        await PickledDataset.create(KillsItsWorker(N, at=10), folder, shards=2, client="process")
    assert (folder / "manifest.json").read_bytes() == before
    await check_items(folder, N, 3)  # and the failed run's files are gone


async def test_the_context_goes_into_the_manifest_as_json(tmp_path: Path) -> None:
    source = DictDataset({1: "a"})
    source.context = {"split": "train", (1, 2): {"ratio": 0.5, "tags": ("a", 1)}, "f": len}  # type: ignore[attr-defined]
    await PickledDataset.create(source, tmp_path / "set", shards=1)
    assert manifest(tmp_path / "set")["context"] == {
        "split": "train", "(1, 2)": {"ratio": 0.5, "tags": ["a", 1]}, "f": repr(len)
    }
    async with await PickledDataset.open(tmp_path / "set") as ds:
        assert ds.context == source.context  # exactly, from the shards


async def test_duplicate_keys_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the key 2 is given twice"):
        await PickledDataset.create(Numbers(5), tmp_path / "set", [1, 2, 3, 2], shards=2)
    assert not (tmp_path / "set").exists()


async def test_files_that_are_not_ours_are_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "shard-mine.pkl").write_bytes(b"user data")
    await PickledDataset.create(Numbers(10), folder, shards=2)
    await PickledDataset.create(Numbers(10), folder, shards=2)
    assert (folder / "shard-mine.pkl").read_bytes() == b"user data"
    assert len(os.listdir(folder)) == 4


async def test_any_executor(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert await PickledDataset.create(Numbers(N), folder, shards=5, client=pool) == N
    await check_items(folder, N, 5)


async def test_in_this_process_nothing_is_pickled(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    source = HoldsLock(N)  # fine here: it never leaves the process
    assert await PickledDataset.create(source, folder, shards=3) == N
    await check_items(folder, N, 3)


async def test_more_shards_than_items(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    assert await PickledDataset.create(DictDataset({"a": 1, "b": 2}), folder, shards=4) == 2
    async with await PickledDataset.open(folder) as ds:
        assert ds.shard_groups() == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert await ds.query_items(["b", "a"]) == [2, 1]


async def test_a_cancelled_create_leaves_the_previous_set(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    await PickledDataset.create(Numbers(10), folder, shards=2)
    before = sorted(os.listdir(folder)), (folder / "manifest.json").read_bytes()
    source = Gated(2000, gate_at=1500)
    task = asyncio.create_task(PickledDataset.create(source, folder, shards=2))
    await wait_until(lambda: source.reached is not None and source.reached.is_set())
    assert len(os.listdir(folder)) > 3  # the first new shard is written
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (sorted(os.listdir(folder)), (folder / "manifest.json").read_bytes()) == before
    assert leftovers(str(folder)) == []


async def test_bad_arguments(tmp_path: Path) -> None:
    source = Numbers(3)
    with pytest.raises(ValueError, match="needs shards=N"):
        await PickledDataset.create(source, tmp_path / "a", client="process")
    with pytest.raises(ValueError, match="shards must be a positive int"):
        await PickledDataset.create(source, tmp_path / "a", shards=0)
    with pytest.raises(TypeError, match="client must be"):
        await PickledDataset.create(source, tmp_path / "a", shards=2, client=object())
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="it is a file, not a folder"):
        await PickledDataset.create(source, tmp_path / "file", shards=2)
