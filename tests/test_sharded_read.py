"""Reading a sharded PickledDataset: one dataset over its files, and what a bad folder raises."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import (
    CorruptFileError,
    DictDataset,
    PickledDataset,
    PickledFileError,
    UnsupportedVersionError,
)
from mlworkflow_async.__main__ import main

from ._http_server import serve_files
from ._pickled_util import assert_same
from ._range_server import serve_folder
from ._sharded_sources import Numbers, item

N = 250
REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "set"
    asyncio.run(PickledDataset.create(Numbers(N), out, shards=4))
    return out


def manifest(folder: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((folder / "manifest.json").read_bytes())
    return document


def rewrite_manifest(folder: Path, document: Any) -> None:
    (folder / "manifest.json").write_text(json.dumps(document))


async def test_keys_in_shard_order_and_lookup_by_key(folder: Path) -> None:
    async with await PickledDataset.open(folder) as ds:
        assert isinstance(ds, PickledDataset)
        assert list(ds.yield_keys()) == list(range(N))
        assert len(ds) == N
        assert ds.shard_groups() == [(0, 62), (62, 63), (125, 62), (187, 63)]
        assert len(ds.shard_files) == 4
        assert ds.context == {"made_by": "Numbers", "n": N}
        assert ds.file_size == sum(s["size"] for s in manifest(folder)["shards"])
        order = list(range(N))
        random.Random(1).shuffle(order)
        for value, key in zip(await ds.query_items(order), order, strict=True):
            assert_same(value, item(key))
        assert_same(await ds.query_item(249), item(249))
        assert await ds.query_items([]) == []
        with pytest.raises(KeyError, match=f"1000 is not a key of the sharded .*{folder}"):
            await ds.query_items([3, 1000])
        with pytest.raises(KeyError, match="unhashable"):
            await ds.query_item([1])


async def test_batches_cross_shard_boundaries(folder: Path) -> None:
    async with await PickledDataset.open(folder) as ds:
        seen: list[int] = []
        async for keys, batch in ds.batches(40, concurrency=80):
            assert batch["i"].tolist() == keys
            assert batch["x"].shape == (len(keys), 8)
            seen.extend(keys)
        assert seen == list(range(N))


def test_the_blocking_view_and_pickling(folder: Path) -> None:
    with PickledDataset(folder) as ds:
        for value, key in zip(ds.sync.query_items([0, 200]), [0, 200], strict=True):
            assert_same(value, item(key))
        again = pickle.loads(pickle.dumps(ds))
        assert type(again) is type(ds)
        assert list(again.yield_keys()) == list(ds.yield_keys())
        assert_same(again.sync.query_item(130), item(130))
        again.close()
        assert again.closed
        assert not ds.closed
        assert "250 items in 4 shards" in repr(ds)
    assert ds.closed


def test_the_blocking_api(tmp_path: Path) -> None:
    from mlworkflow_async import sync

    folder = tmp_path / "set"
    assert sync.PickledDataset.create(Numbers(20), folder, shards=2) == 20
    with sync.PickledDataset(folder) as ds:
        assert ds.dataset.shard_groups() == [(0, 10), (10, 10)]  # type: ignore[attr-defined]
        assert_same(ds.query_item(15), item(15))


def test_the_manifest_path_opens_the_folder_too(folder: Path) -> None:
    with PickledDataset(folder / "manifest.json", safe=True) as ds:
        assert len(ds) == N


async def test_info_and_verify(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(main, ["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "shards:  4 files" in out
    assert "items:   250" in out
    assert await asyncio.to_thread(main, ["verify", str(folder)]) == 0
    assert "OK: all 250 items" in capsys.readouterr().out

    # A byte changed inside an item: the sizes still match, the digest does not.
    shard = folder / manifest(folder)["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert await asyncio.to_thread(main, ["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out
    assert shard.name in out


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda d: "not json {", CorruptFileError, "it is not JSON"),
        (lambda d: [1, 2], CorruptFileError, "does not say"),
        (lambda d: {**d, "version": 99}, UnsupportedVersionError, "newer than this library"),
        (lambda d: {**d, "version": "1"}, CorruptFileError, "not a number"),
        (lambda d: {**d, "shards": []}, CorruptFileError, "non-empty list"),
        (lambda d: {**d, "items": 7}, CorruptFileError, "not the sum"),
        (lambda d: {**d, "shards": [{**d["shards"][0], "file": "../../etc/passwd"}]},
         CorruptFileError, "not a plain name"),
        (lambda d: {**d, "shards": [{**d["shards"][0], "file": ".hidden"}]},
         CorruptFileError, "not a plain name"),
        (lambda d: {**d, "shards": [d["shards"][0], d["shards"][0]],
                    "items": 2 * d["shards"][0]["items"]}, CorruptFileError, "listed twice"),
        (lambda d: {**d, "shards": [{**d["shards"][0], "items": True}]},
         CorruptFileError, "valid \"items\""),
        (lambda d: {**d, "shards": [{**d["shards"][0], "sha256": "x"}]},
         CorruptFileError, "sha256"),
        (lambda d: {**d, "shards": [{**s, "items": s["items"] + 1} for s in d["shards"]],
                    "items": d["items"] + 4}, CorruptFileError, "does not match its manifest"),
        (lambda d: {**d, "shards": [{**d["shards"][0], "file": "missing.pkl"}, *d["shards"][1:]]},
         FileNotFoundError, "missing.pkl"),
    ],
)
def test_a_bad_manifest_is_a_clear_error(
    folder: Path, change: Any, error: type[Exception], message: str
) -> None:
    document = change(manifest(folder))
    if isinstance(document, str):
        (folder / "manifest.json").write_text(document)
    else:
        rewrite_manifest(folder, document)
    with pytest.raises(error, match=message):
        PickledDataset(folder)


def test_shards_sharing_keys_are_refused(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    asyncio.run(PickledDataset.create(Numbers(10), one, shards=1))
    asyncio.run(PickledDataset.create(Numbers(10), two, shards=1))
    document = manifest(one)
    other = manifest(two)["shards"][0]
    os.replace(two / other["file"], one / other["file"])
    document["shards"].append(other)
    document["items"] += other["items"]
    rewrite_manifest(one, document)
    with pytest.raises(CorruptFileError, match="keys that an earlier shard already holds"):
        PickledDataset(one)


def test_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=r"Is a directory, without the manifest\.json"):
        PickledDataset(tmp_path)


def damage_manifest(folder: str, rounds: int) -> int:
    """Open ``folder`` with randomly damaged manifests; the number that still opened."""
    path = Path(folder) / "manifest.json"
    good = path.read_bytes()
    rng = random.Random(7)
    opened = 0
    for _ in range(rounds):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        with contextlib.suppress(PickledFileError, OSError):  # the clear errors
            PickledDataset(folder).close()
            opened += 1
    return opened


def test_random_damage_to_the_manifest_is_always_a_clear_error(folder: Path) -> None:
    # In a child process, as every test of damaged files: a crash fails, not kills, the run.
    code = (
        f"from tests.test_sharded_read import damage_manifest; "
        f"damage_manifest({str(folder)!r}, 300)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


async def test_open_at_a_url(folder: Path) -> None:
    # A real range-aware HTTP server on loopback serving the folder's parent.
    with serve_folder(str(folder.parent)) as server:
        async with await PickledDataset.open(server.url(f"{folder.name}/")) as ds:
            assert list(ds.yield_keys()) == list(range(N))
            assert_same(await ds.query_item(200), item(200))


async def test_a_missing_manifest_at_a_url_names_it(folder: Path) -> None:
    with serve_files({}, delay=0) as server:
        with pytest.raises(PickledFileError, match=r"manifest.json: the server answered HTTP 404"):
            await PickledDataset.open(server.url("set/"))
        with pytest.raises(PickledFileError, match="HTTP 404"):
            PickledDataset(server.url("set/"))


async def rank_parts(folder: Path, world: int) -> tuple[list[list[int]], list[int], list[set[int]]]:
    """What each rank of ``world`` reads: its keys, its batch count; and the files' key sets."""
    async with await PickledDataset.open(folder) as ds:
        groups = [set(range(a, a + n)) for a, n in ds.shard_groups()]
        parts, counts = [], []
        for rank in range(world):
            keys: list[int] = []
            batches = 0
            async for batch_keys, _ in ds.batches(10, shard=(rank, world), drop_incomplete=True):
                keys.extend(batch_keys)
                batches += 1
            parts.append(keys)
            counts.append(batches)
    return parts, counts, groups


@pytest.mark.parametrize(("shards", "world"), [(4, 2), (4, 4), (3, 2), (2, 4)])
async def test_ranks_read_disjoint_complete_parts(tmp_path: Path, shards: int, world: int) -> None:
    folder = tmp_path / "set"
    await PickledDataset.create(DictDataset({i: i for i in range(240)}), folder, shards=shards)
    parts, counts, _ = await rank_parts(folder, world)
    assert len(set(counts)) == 1  # equal batch counts
    flat = [k for part in parts for k in part]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == list(range(240))  # complete: 240 splits evenly here


async def test_ranks_read_whole_files_where_the_counts_allow(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    await PickledDataset.create(DictDataset({i: i for i in range(240)}), folder, shards=4)
    parts, _, groups = await rank_parts(folder, 2)
    for part in parts:
        assert set(part) == set().union(*(g for g in groups if g & set(part)))


def test_arrays_are_intact_with_mmap(tmp_path: Path) -> None:
    folder = tmp_path / "arrays"
    source = DictDataset({i: np.full(1000, i, np.float32) for i in range(20)})
    asyncio.run(PickledDataset.create(source, folder, shards=3))
    with PickledDataset(folder, mmap=True) as ds:
        for key, value in zip(range(20), ds.sync.query_items(list(range(20))), strict=True):
            np.testing.assert_array_equal(value, np.full(1000, key, np.float32))
