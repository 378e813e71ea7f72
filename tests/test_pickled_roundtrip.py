"""PickledDataset: writing and reading back, file layout, memory maps, life cycle."""

from __future__ import annotations

import asyncio
import hashlib
import io
import mmap
import struct
import sys
from typing import Any

import anyio
import mlworkflow
import numpy as np
import pytest

from mlworkflow_async import (
    DictDataset,
    PickledDataset,
    UnpicklableItemError,
    UnsupportedVersionError,
)
from mlworkflow_async._store._checksum import checksum_function
from mlworkflow_async._store._format import HEADER_SIZE, MAGIC, TRAILER_SIZE

from ._pickled_util import Key, Point, assert_same, leftovers, small_items

VARIED: dict[Any, Any] = {
    Key("dict", 0): {"x": np.arange(6, dtype=np.float32), "label": 3, "name": "a"},
    Key("tuple", 1): (1, 2.5, "s", b"bytes", None, True, [1, [2, 3]], {4, 5}, frozenset({6})),
    Key("2d", 2): np.arange(12.0).reshape(3, 4),
    Key("fortran", 3): np.asfortranarray(np.arange(12).reshape(3, 4)),
    Key("strided", 4): np.arange(20)[::3],
    Key("0d", 5): np.array(7.5),
    Key("empty", 6): np.zeros((0, 3), dtype=np.int16),
    Key("structured", 7): np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    Key("objects", 8): np.array([1, "two", None], dtype=object),
    Key("dates", 9): np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
    Key("strings", 10): np.array(["ab", "cde"]),
    Key("scalars", 11): (np.float32(1.5), np.int64(-3), complex(1, 2), np.bool_(True)),
    Key("readonly", 12): np.arange(5).copy(),
    Key("class", 13): Point(1.0, 2.0),
    Key("big-endian", 14): np.arange(4, dtype=">i4"),
}
VARIED[Key("readonly", 12)].flags.writeable = False


def array_owner(array: np.ndarray) -> object:
    """The object whose memory an array uses, following ``.base`` and memoryviews."""
    owner: Any = array
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    while isinstance(owner, memoryview):
        owner = owner.obj
    return owner


async def test_roundtrip_of_varied_items_with_namedtuple_keys(tmp_path: Any) -> None:
    path = tmp_path / "varied.pkl"
    assert await PickledDataset.create(DictDataset(VARIED), path) == len(VARIED)
    with PickledDataset(path) as ds:
        assert await ds.keys.all() == list(VARIED)
        items = await ds.query_items(list(VARIED))
        for key, item in zip(VARIED, items, strict=True):
            if key.name == "class":
                assert item == VARIED[key]
            else:
                assert_same(VARIED[key], item)
        # Arrays come back writable unless they were written read-only.
        assert items[0]["x"].flags.writeable
        assert not items[12].flags.writeable
        for key in list(VARIED)[:3]:
            assert_same(VARIED[key], await ds.query_item(key))


async def test_keys_len_and_context_are_known_as_soon_as_open(tmp_path: Any) -> None:
    source = DictDataset(small_items(50))
    source.context = {"split": "train", "mean": np.float64(0.5)}  # type: ignore[attr-defined]
    path = tmp_path / "ctx.pkl"
    await PickledDataset.create(source, path)
    ds = await PickledDataset.open(path)
    assert len(ds) == 50
    assert ds.keys.complete
    assert ds.keys.known == tuple(source.dic)
    assert ds.context == {"split": "train", "mean": 0.5}
    assert ds.format_version == 2
    assert ds.path == str(path)
    assert ds.file_size == (await anyio.Path(path).stat()).st_size
    ds.close()

    await PickledDataset.create(DictDataset({1: 1}), tmp_path / "plain.pkl")
    with PickledDataset(tmp_path / "plain.pkl") as plain:
        assert plain.context == {}


async def test_file_layout_header_trailer_and_aligned_buffers(tmp_path: Any) -> None:
    items = {
        "small": {"a": np.arange(3, dtype=np.uint8), "b": np.arange(5, dtype=np.float64)},
        "big": np.ones(300_000, dtype=np.float64),  # 2.4 MB: page aligned
        "none": [1, 2, 3],
    }
    path = tmp_path / "layout.pkl"
    await PickledDataset.create(DictDataset(items), path, format_version=1)
    data = path.read_bytes()
    assert data[:8] == MAGIC
    assert struct.unpack_from("<I", data, 8)[0] == 1
    assert data[-8:] == b"MLWDSEND"
    index_offset, index_length = struct.unpack_from("<QQ", data, len(data) - TRAILER_SIZE)
    assert index_offset + index_length == len(data) - TRAILER_SIZE
    with PickledDataset(path) as ds:
        entries = ds._reader.entries
        assert entries["small"][0] >= HEADER_SIZE
        for _offset, _span, plen, buffers in entries.values():
            for a, _b in buffers or ():
                assert a >= plen
        starts = [entries[k][0] + a for k in ("small", "big") for a, _ in entries[k][3]]
        assert all(start % 64 == 0 for start in starts)
        assert (entries["big"][0] + entries["big"][3][0][0]) % 4096 == 0
        assert entries["none"][3] is None
        small = await ds.query_item("small")
        assert small["b"].ctypes.data % 16 == 0
        assert small["b"].flags.aligned


async def test_large_arrays_are_private_copy_on_write(tmp_path: Any) -> None:
    arrays = {i: np.random.default_rng(i).random((512, 600)) for i in range(3)}  # 2.4 MB each
    path = tmp_path / "large.pkl"
    await PickledDataset.create(DictDataset(arrays), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    async with await PickledDataset.open(path) as ds:
        got = await ds.query_items([2, 0, 1])
        for key, array in zip([2, 0, 1], got, strict=True):
            np.testing.assert_array_equal(array, arrays[key])
            assert array.flags.writeable
            assert array.flags.aligned
        got[0][:] = -1.0  # writes stay private to this array
        again = await ds.query_item(2)
        np.testing.assert_array_equal(again, arrays[2])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    np.testing.assert_array_equal(got[1], arrays[0])  # still valid after close
    assert isinstance(array_owner(got[1]), mmap.mmap)


async def test_large_arrays_are_copied_where_maps_are_unavailable(tmp_path: Any) -> None:
    array = np.arange(300_000, dtype=np.float64)
    path = tmp_path / "copied.pkl"
    await PickledDataset.create(DictDataset({"a": array}), path)
    async with await PickledDataset.open(path) as ds:
        ds._reader.private_maps = False  # as without Linux page cache calls
        got = await ds.query_item("a")
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable
    assert isinstance(array_owner(got), bytearray)


async def test_mmap_arrays_are_read_only_views_of_the_file(tmp_path: Any) -> None:
    items = {
        "small": {"v": np.arange(100, dtype=np.int32), "n": 1},
        "big": np.arange(400_000, dtype=np.float32),
        "grid": np.arange(24.0).reshape(2, 3, 4),
    }
    path = tmp_path / "map.pkl"
    await PickledDataset.create(DictDataset(items), path, format_version=1)
    ds = PickledDataset(path, mmap=True)
    the_map = ds._reader._handle.map
    assert isinstance(the_map, mmap.mmap)
    small, big, grid = await ds.query_items(["small", "big", "grid"])
    for array, expected in ((small["v"], items["small"]["v"]), (big, items["big"]),
                            (grid, items["grid"])):
        np.testing.assert_array_equal(array, expected)
        assert not array.flags.writeable
        assert array_owner(array) is the_map
        assert np.shares_memory(array, np.frombuffer(the_map, dtype=np.uint8))
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0
    ds.close()  # the map outlives the dataset while arrays use it
    np.testing.assert_array_equal(big, items["big"])


async def test_context_managers_and_close(tmp_path: Any) -> None:
    path = tmp_path / "c.pkl"
    await PickledDataset.create(DictDataset({"a": 1}), path)
    async with await PickledDataset.open(path) as ds:
        assert await ds.query_item("a") == 1
    assert ds.closed
    with pytest.raises(ValueError, match="closed"):
        await ds.query_item("a")
    ds.close()  # closing twice is harmless
    assert "closed" in repr(ds)


def test_blocking_use_in_a_script(tmp_path: Any) -> None:
    path = tmp_path / "script.pkl"
    asyncio.run(PickledDataset.create(DictDataset({"a": 1, "b": 2}), path))
    with PickledDataset(path) as ds:
        assert ds.sync.query_item("a") == 1
        assert [keys for keys, _ in ds.sync.batches(1)] == [["a"], ["b"]]
    assert ds.closed


async def test_missing_key_raises_key_error_naming_it(tmp_path: Any) -> None:
    path = tmp_path / "k.pkl"
    await PickledDataset.create(DictDataset(small_items(5)), path)
    with PickledDataset(path) as ds:
        with pytest.raises(KeyError, match=r"Key\(name='nope', index=9\).*k\.pkl"):
            await ds.query_items([Key("k", 1), Key("nope", 9)])
        with pytest.raises(KeyError, match="unhashable"):
            await ds.query_item(["list"])


async def test_batches_read_whole_batches_in_any_key_order(tmp_path: Any) -> None:
    items = small_items(100)
    path = tmp_path / "b.pkl"
    await PickledDataset.create(DictDataset(items), path)
    order = list(items)[::-1]
    with PickledDataset(path) as ds:
        assert ds.batched_queries
        seen = []
        async for keys, batch in ds.batches(16, keys=order):
            np.testing.assert_array_equal(batch["x"], np.stack([items[k]["x"] for k in keys]))
            assert batch["y"].tolist() == [k.index for k in keys]
            seen += keys
        assert seen == order


def test_create_into_an_open_file_object(tmp_path: Any) -> None:
    path = tmp_path / "f.pkl"
    with open(path, "wb") as f:
        asyncio.run(PickledDataset.create(DictDataset({"a": np.arange(3)}), f))
    with PickledDataset(path) as ds:
        np.testing.assert_array_equal(ds.sync.query_item("a"), np.arange(3))
    with open(path, "ab") as f, pytest.raises(ValueError, match="at its start"):
        asyncio.run(PickledDataset.create(DictDataset({"a": 1}), f))
    buffer = io.BytesIO()
    asyncio.run(PickledDataset.create(DictDataset({"b": 2}), buffer))
    assert buffer.getvalue().startswith(MAGIC)


async def test_unpicklable_item_fails_naming_its_key(tmp_path: Any) -> None:
    path = tmp_path / "bad.pkl"
    items = {i: i for i in range(600)}
    items[555] = lambda: None  # type: ignore[assignment]
    with pytest.raises(UnpicklableItemError, match="item 555 cannot be pickled") as info:
        await PickledDataset.create(DictDataset(items), path)
    assert isinstance(info.value, TypeError)
    assert info.value.__cause__ is not None
    assert not path.exists()
    assert leftovers(str(tmp_path)) == []


async def test_duplicate_and_subset_and_async_keys(tmp_path: Any) -> None:
    source = DictDataset({i: str(i) for i in range(10)})
    with pytest.raises(ValueError, match="key 3 appears twice"):
        await PickledDataset.create(source, tmp_path / "dup.pkl", keys=[1, 3, 3])
    assert not (tmp_path / "dup.pkl").exists()

    async def some_keys() -> Any:
        for key in (7, 2, 5):
            await asyncio.sleep(0)
            yield key

    await PickledDataset.create(source, tmp_path / "sub.pkl", keys=some_keys())
    with PickledDataset(tmp_path / "sub.pkl") as ds:
        assert await ds.keys.all() == [7, 2, 5]
        assert await ds.query_items([5, 7]) == ["5", "7"]


async def test_empty_dataset(tmp_path: Any) -> None:
    path = tmp_path / "empty.pkl"
    assert await PickledDataset.create(DictDataset({}), path) == 0
    with PickledDataset(path) as ds:
        assert len(ds) == 0
        assert await ds.query_items([]) == []


async def test_progress_bar_only_when_asked(tmp_path: Any, capsys: Any) -> None:
    source = DictDataset({i: i for i in range(300)})
    await PickledDataset.create(source, tmp_path / "quiet.pkl", concurrency=64)
    assert capsys.readouterr().err == ""
    await PickledDataset.create(source, tmp_path / "loud.pkl", progress=True)
    assert "300/300" in capsys.readouterr().err
    with pytest.raises(ValueError, match="concurrency"):
        await PickledDataset.create(source, tmp_path / "x.pkl", concurrency=0)


async def test_progress_without_tqdm_shows_nothing(
    tmp_path: Any, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if the extra were not installed
    with pytest.raises(ImportError):
        import tqdm  # noqa: F401
    await PickledDataset.create(DictDataset({1: 1}), tmp_path / "p.pkl", progress=True)
    assert capsys.readouterr().err == ""
    with PickledDataset(tmp_path / "p.pkl") as ds:
        assert len(ds) == 1


async def test_missing_folder_is_named(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"cannot write .*absent.*folder does not exist"):
        await PickledDataset.create(DictDataset({1: 1}), tmp_path / "absent" / "x.pkl")


async def test_create_from_a_blocking_original_dataset(tmp_path: Any) -> None:
    original = mlworkflow.DictDataset({"a": np.arange(4), "b": "text"})
    original._context = {"source": "mlworkflow"}
    path = tmp_path / "from_original.pkl"
    assert await PickledDataset.create(original, path) == 2
    with PickledDataset(path) as ds:
        assert ds.context == {"source": "mlworkflow"}
        assert (await ds.query_item("b")) == "text"


async def test_concurrent_reads_from_tasks_and_threads(tmp_path: Any) -> None:
    items = small_items(400)
    items[Key("big", 0)] = {"x": np.arange(500_000, dtype=np.float32)}
    path = tmp_path / "many.pkl"
    await PickledDataset.create(DictDataset(items), path)
    keys = list(items)
    with PickledDataset(path) as ds:
        chunks = [keys[i::25] for i in range(25)]
        results = await asyncio.gather(*(ds.query_items(chunk) for chunk in chunks))
        for chunk, got in zip(chunks, results, strict=True):
            for key, item in zip(chunk, got, strict=True):
                assert_same(items[key], item)
        from_threads = await asyncio.gather(
            *(asyncio.to_thread(ds.sync.query_items, chunk) for chunk in chunks[:4])
        )
        for chunk, got in zip(chunks[:4], from_threads, strict=True):
            assert [g["y"] for g in got if "y" in g] == [k.index for k in chunk if k.name == "k"]


async def test_newer_version_is_refused(tmp_path: Any) -> None:
    path = tmp_path / "future.pkl"
    await PickledDataset.create(DictDataset({"a": 1}), path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, 3)
    algorithm = struct.unpack_from("<I", data, 16)[0]
    csum = checksum_function(algorithm)
    assert csum is not None
    struct.pack_into("<I", data, 60, csum(bytes(data[:60])))  # a sound header, from the future
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersionError, match="written by a newer version") as info:
        PickledDataset(path)
    assert info.value.path == str(path)


def test_constructor_wants_a_path() -> None:
    with pytest.raises(TypeError, match="path"):
        PickledDataset(io.BytesIO())  # type: ignore[arg-type]
