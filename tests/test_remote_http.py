"""PickledDataset files read over HTTP from a real server on 127.0.0.1.

The server (uvicorn + Starlette's range-aware ``FileResponse``) runs in a
thread; its fault injection drops connections, answers 503 or ignores
ranges, and it records every request, which the tests count.
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import DictDataset, PickledDataset
from mlworkflow_async.exceptions import (
    CorruptFileError,
    RemoteFileChangedError,
    RemoteFileError,
    RemoteFileNotFoundError,
    UnsafePickleError,
)

from ._pickled_util import Key, Point, assert_same, small_items, write_file, write_original_file
from ._range_server import RangeServer, refused_url, serve_folder

N = 600


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    write_file(root / "small.pkl", small_items(N), context={"about": "small"})
    write_file(root / "small1.pkl", small_items(N), context={"about": "small"}, version=1)
    big = {i: {"a": np.full(300_000, i, dtype=np.float64), "i": i} for i in range(6)}
    write_file(root / "arrays.pkl", big)
    write_file(root / "points.pkl", {"p": Point(1.0, 2.0)})
    write_original_file(root / "original.pkl", {"a": 1, "b": [2, 3]}, context={"v": 1})
    return root


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[RangeServer]:
    with serve_folder(str(folder)) as running:
        yield running


@pytest.fixture(autouse=True)
def no_faults(server: RangeServer) -> Iterator[None]:
    yield
    faults = server.faults
    faults.latency, faults.fail_every, faults.drop_every = 0.0, 0, 0
    faults.ignore_ranges = False
    faults.reset()


async def test_keys_items_context_and_batches_match_the_local_file(
    server: RangeServer, folder: Path
) -> None:
    expected = small_items(N)
    with PickledDataset(folder / "small.pkl") as local:
        async with await PickledDataset.open(server.url("small.pkl")) as ds:
            assert list(ds.yield_keys()) == list(local.yield_keys())
            assert ds.context == {"about": "small"}
            assert ds.file_size == local.file_size
            assert ds.format_version == 2
            assert ds.path == server.url("small.pkl")
            assert_same(await ds.query_item(Key("k", 7)), expected[Key("k", 7)])
            keys = list(expected)
            random.Random(0).shuffle(keys)
            seen = []
            async for batch_keys, batch in ds.batches(64, keys):
                seen += batch_keys
                assert_same(batch["y"], np.array([k.index for k in batch_keys]))
            assert seen == keys


async def test_format_1_files_are_read_too(server: RangeServer) -> None:
    expected = small_items(N)
    async with await PickledDataset.open(server.url("small1.pkl")) as ds:
        assert ds.format_version == 1
        assert ds.context == {"about": "small"}
        keys = [Key("k", i) for i in range(0, N, 7)]
        for key, item in zip(keys, await ds.query_items(keys), strict=True):
            assert_same(item, expected[key])


async def test_a_damaged_item_fails_its_checksum(server: RangeServer, folder: Path) -> None:
    data = bytearray((folder / "small.pkl").read_bytes())
    async with await PickledDataset.open(server.url("small.pkl")) as ds:
        offset, span = ds._index.locate(Key("k", 3))[:2]
    data[offset + span // 2] ^= 0x10
    (folder / "flipped.pkl").write_bytes(bytes(data))
    async with await PickledDataset.open(server.url("flipped.pkl")) as ds:
        with pytest.raises(CorruptFileError, match=r"index=3\) is damaged \(checksum mismatch\)"):
            await ds.query_item(Key("k", 3))
        assert (await ds.query_item(Key("k", 4)))["y"] == 4


async def test_opening_a_file_whose_index_fits_in_the_last_bytes_is_one_request(
    server: RangeServer,
) -> None:
    async with await PickledDataset.open(server.url("points.pkl")):
        assert server.faults.ranged("points.pkl") == ["bytes=-65536"]


async def test_opening_a_large_file_is_two_requests(server: RangeServer, folder: Path) -> None:
    # The last bytes (the footer holds a copy of the header), then the index
    # region, which does not fit in the 4 KiB fetched first.
    size = (folder / "small.pkl").stat().st_size
    async with await PickledDataset.open(server.url("small.pkl"), tail=4096) as ds:
        ranges = server.faults.ranged("small.pkl")
        assert len(await ds.keys.all()) == N
    assert ranges[0] == "bytes=-4096"
    assert len(ranges) == 2
    start, stop = map(int, ranges[1].removeprefix("bytes=").split("-"))
    assert 64 < start < stop < size  # the index region, not the header


async def test_opening_a_format1_file_reads_its_header_too(server: RangeServer) -> None:
    # Format 1 keeps its header at the start: one more request when the
    # file is larger than the bytes fetched first.
    async with await PickledDataset.open(server.url("small1.pkl")):
        ranges = server.faults.ranged("small1.pkl")
    assert ranges[0] == "bytes=-65536"
    assert ranges[1] == "bytes=0-63"
    assert len(ranges) <= 3


async def test_one_batch_travels_in_few_grouped_requests(server: RangeServer) -> None:
    async with await PickledDataset.open(server.url("small.pkl"), gap=1024) as ds:
        server.faults.reset()
        keys = [Key("k", i) for i in range(100, 164)]  # neighbours: one request
        await ds.query_items(keys)
        assert len(server.faults.ranged("small.pkl")) == 1
        server.faults.reset()
        spread = [Key("k", i) for i in range(0, 300, 50)]  # far apart: one each
        await ds.query_items(spread)
        assert len(server.faults.ranged("small.pkl")) == len(spread)


async def test_a_large_gap_groups_distant_items(server: RangeServer) -> None:
    async with await PickledDataset.open(server.url("small.pkl"), gap=1 << 20) as ds:
        server.faults.reset()
        await ds.query_items([Key("k", i) for i in range(0, 500, 50)])
        assert len(server.faults.ranged("small.pkl")) == 1


async def test_a_shuffled_epoch_costs_fewer_requests_than_items(server: RangeServer) -> None:
    keys = list(small_items(N))
    random.Random(1).shuffle(keys)
    async with await PickledDataset.open(server.url("small.pkl")) as ds:
        server.faults.reset()
        batches = 0
        async for _ in ds.batches(64, keys):
            batches += 1
        requests = len(server.faults.ranged("small.pkl"))
    assert batches == -(-N // 64)
    assert requests <= batches * 8 < N


async def test_requests_in_flight_are_bounded_per_host(server: RangeServer) -> None:
    server.faults.latency = 0.02
    async with await PickledDataset.open(
        server.url("small.pkl"), gap=0, max_requests=3, tail=1024
    ) as ds, await PickledDataset.open(
        server.url("original.pkl"), max_requests=3, tail=16
    ) as other:
        server.faults.reset()
        spread = [Key("k", i) for i in range(0, 600, 30)]
        await ds.query_items(spread)
        await other.query_items(["a"])
    assert len(server.faults.requests) == len(spread) + 1
    assert server.faults.max_active <= 3


async def test_large_arrays_come_back_writable(server: RangeServer) -> None:
    async with await PickledDataset.open(server.url("arrays.pkl")) as ds:
        item = await ds.query_item(3)
    assert item["a"].flags.writeable
    item["a"][0] = -1
    assert (item["a"][1:] == 3).all()


async def test_transient_failures_are_retried(server: RangeServer) -> None:
    expected = small_items(N)
    async with await PickledDataset.open(
        # Enough retries that no request fails every time, whatever the interleaving.
        server.url("small.pkl"), gap=0, backoff=0.001, max_backoff=0.01, retries=40
    ) as ds:
        server.faults.drop_every, server.faults.fail_every = 3, 5
        keys = [Key("k", i) for i in range(0, 600, 20)]
        items = await ds.query_items(keys)
    for key, item in zip(keys, items, strict=True):
        assert_same(item, expected[key])
    assert ds._reader.source.stats.retries > 0  # type: ignore[union-attr]


async def test_a_final_failure_names_the_url_the_range_and_the_key(server: RangeServer) -> None:
    url = server.url("small.pkl")
    async with await PickledDataset.open(url, retries=2, backoff=0.001) as ds:
        server.faults.fail_every = 1
        with pytest.raises(RemoteFileError) as caught:
            await ds.query_item(Key("k", 5))
    message = str(caught.value)
    assert url in message
    assert "failed after 3 attempts" in message
    assert "HTTP 503" in message
    assert "bytes " in message
    assert "Key(name='k', index=5)" in message
    assert caught.value.path == url


async def test_a_missing_file_is_a_clear_error(server: RangeServer) -> None:
    url = server.url("absent.pkl")
    with pytest.raises(RemoteFileNotFoundError, match=r"not found.*404") as caught:
        await PickledDataset.open(url)
    assert isinstance(caught.value, FileNotFoundError)
    assert caught.value.path == url


async def test_a_refused_connection_is_a_clear_error() -> None:
    url = refused_url()
    with pytest.raises(RemoteFileError, match="connection refused") as caught:
        await PickledDataset.open(url)
    assert url in str(caught.value)


async def test_a_server_without_range_support_is_a_clear_error(server: RangeServer) -> None:
    server.faults.ignore_ranges = True
    with pytest.raises(RemoteFileError, match="does not answer byte-range requests"):
        await PickledDataset.open(server.url("small.pkl"))


async def test_a_file_changed_on_the_server_while_open_is_detected(
    server: RangeServer, folder: Path, tmp_path: Path
) -> None:
    path = folder / "changing.pkl"
    await PickledDataset.create(DictDataset(small_items(50)), path)
    try:
        async with await PickledDataset.open(server.url("changing.pkl"), tail=16) as ds:
            await ds.query_item(Key("k", 1))
            await PickledDataset.create(DictDataset(small_items(60)), tmp_path / "new.pkl")
            os.replace(tmp_path / "new.pkl", path)
            with pytest.raises(RemoteFileChangedError, match="changed on the server"):
                await ds.query_item(Key("k", 2))
    finally:
        path.unlink()


async def test_a_damaged_file_is_a_corrupt_file_error(server: RangeServer, folder: Path) -> None:
    (folder / "junk.pkl").write_bytes(os.urandom(5000))
    with pytest.raises(CorruptFileError, match=r"junk\.pkl"):
        await PickledDataset.open(server.url("junk.pkl"))
    (folder / "empty.pkl").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        await PickledDataset.open(server.url("empty.pkl"))


async def test_safe_mode_applies_to_remote_files(server: RangeServer) -> None:
    async with await PickledDataset.open(server.url("points.pkl"), safe=True) as ds:
        with pytest.raises(UnsafePickleError, match="Point"):
            await ds.query_item("p")
    async with await PickledDataset.open(
        server.url("points.pkl"), safe=True, allow=[Point]
    ) as ds:
        assert await ds.query_item("p") == Point(1.0, 2.0)


async def test_files_of_the_original_library_are_read_too(server: RangeServer) -> None:
    async with await PickledDataset.open(server.url("original.pkl")) as ds:
        assert ds.format_version == 0
        assert ds.context == {"v": 1}
        assert await ds.query_items(["a", "b"]) == [1, [2, 3]]


async def test_unknown_keys_and_local_only_options(server: RangeServer, folder: Path) -> None:
    async with await PickledDataset.open(server.url("points.pkl")) as ds:
        with pytest.raises(KeyError, match="nope"):
            await ds.query_item("nope")
    with pytest.raises(TypeError, match="cache_dir only apply to files behind URLs"):
        PickledDataset(folder / "points.pkl", cache_dir="somewhere")
    with pytest.raises(ValueError, match="cache_dir"):
        await PickledDataset.open(server.url("points.pkl"), mmap=True)


def test_the_blocking_constructor_and_view(server: RangeServer) -> None:
    with PickledDataset(server.url("small.pkl")) as ds:
        assert len(ds) == N
        assert ds.sync.query_item(Key("k", 3))["y"] == 3
        assert [k.index for k in ds.sync.keys.all()][:3] == [0, 1, 2]
        batches = list(ds.sync.batches(100))
        assert len(batches) == 6


def test_a_remote_dataset_pickles_by_url_and_options(server: RangeServer) -> None:
    with PickledDataset(server.url("small.pkl"), gap=123, safe=True, allow=[Key]) as ds:
        copy: Any = pickle.loads(pickle.dumps(ds))
    with copy:
        assert copy.path == server.url("small.pkl")
        assert copy._reader.source.options.gap == 123
        assert copy.sync.query_item(Key("k", 9))["y"] == 9


def test_info_and_verify_on_a_url(server: RangeServer, capsys: pytest.CaptureFixture[str]) -> None:
    from mlworkflow_async.__main__ import main

    url = server.url("small.pkl")
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert url in out
    assert f"items:   {N}" in out
    assert main(["verify", url]) == 0
    assert f"OK: all {N} items" in capsys.readouterr().out
    assert main(["info", server.url("absent.pkl")]) == 1
    assert "not found" in capsys.readouterr().err


def test_remote_files_under_trio(server: RangeServer) -> None:
    import anyio

    pytest.importorskip("trio")

    async def main() -> list[Any]:
        async with await PickledDataset.open(server.url("small.pkl"), tail=16) as ds:
            return [batch_keys async for batch_keys, _ in ds.batches(100)]

    batches = anyio.run(main, backend="trio")
    assert sum(len(keys) for keys in batches) == N


async def test_shuffled_sharded_and_resumed_epochs(server: RangeServer, folder: Path) -> None:
    async with await PickledDataset.open(server.url("small.pkl")) as ds, await PickledDataset.open(
        folder / "small.pkl"
    ) as local:
        remote_keys = []
        for rank in (0, 1):
            async for keys, _ in ds.batches(64, shuffle=7, epoch=2, shard=(rank, 2)):
                remote_keys += keys
        local_keys = []
        for rank in (0, 1):
            async for keys, _ in local.batches(64, shuffle=7, epoch=2, shard=(rank, 2)):
                local_keys += keys
        assert remote_keys == local_keys
        assert sorted(remote_keys) == sorted(ds.yield_keys())
        stream = ds.batches(64, shuffle=7)
        first = [keys for keys, _ in [await anext(stream) for _ in range(3)]]
        state = stream.state_dict()
        await stream.aclose()
        rest = [keys async for keys, _ in ds.batches(64, shuffle=7, resume=state)]
        every = [keys async for keys, _ in local.batches(64, shuffle=7)]
        assert first + rest == every
