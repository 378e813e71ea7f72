"""Format 2: what goes in comes out, found by its pickled key; the layout is as documented."""

from __future__ import annotations

import asyncio
import gc
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import DictDataset, PickledDataset
from mlworkflow_async._core import _collate
from mlworkflow_async._store import _checksum, _format2
from mlworkflow_async._store._batch_buffers import BatchBuffers
from mlworkflow_async._store._checksum import checksum_function
from mlworkflow_async._store._format2 import (
    FIRST_FOOTER,
    FIRST_FOOTER_SIZE,
    FOOTER,
    FOOTER_SIZE,
    HEADER2,
    key_bytes,
)
from mlworkflow_async._store._reads2 import Reader2
from mlworkflow_async._store._writes import AtomicFile
from mlworkflow_async.exceptions import CorruptFileError

from ._pickled_util import Key, assert_same, small_items, write_file

ITEMS: dict[Any, Any] = {
    "none": None,
    "text": "hello" * 10,
    ("tuple", 1): [1, 2.5, {"nested": (3, 4)}],
    Key("k", 7): {"a": np.arange(3, dtype=np.uint8), "b": np.arange(5, dtype=np.float64)},
    7: np.arange(24, dtype=np.int16).reshape(2, 3, 4),
    -3: np.ones(300_000, dtype=np.float32),  # 1.2 MB: page-aligned and mapped
    2.5: {"many": [np.full(i + 1, i) for i in range(5)]},
    b"raw": np.zeros(0),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "longdouble": np.arange(3, dtype=np.longdouble),
}


class Wrapped(np.ndarray):  # type: ignore[type-arg]
    """An array subclass: not what the default collation would make of it."""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    target = tmp_path / "v2.pkl"
    write_file(target, ITEMS, {"split": "train"})
    return target


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("inline", [True, False])
async def test_every_item_reads_back(path: Path, mmap: bool, inline: bool) -> None:
    async with await PickledDataset.open(path, mmap=mmap) as ds:
        assert ds.format_version == 2
        ds._reader.inline = inline and ds._reader.inline
        keys = list(ITEMS)
        for key, item in zip(keys, await ds.query_items(keys), strict=True):
            assert_same(ITEMS[key], item)
        for key in keys:  # one by one, and a second time (mapped arrays checked once)
            assert_same(ITEMS[key], await ds.query_item(key))
        assert ds.context == {"split": "train"}


def test_len_is_known_at_open_and_keys_come_in_file_order(path: Path) -> None:
    with PickledDataset(path) as ds:
        assert len(ds) == len(ITEMS)
        assert list(ds.sync.keys.all()) == list(ITEMS)


def test_keys_are_found_by_value_not_identity(path: Path) -> None:
    with PickledDataset(path) as ds:
        assert ds.sync.query_item(("tu" + "ple", 1)) == ITEMS[("tuple", 1)]
        assert_same(ITEMS[7], ds.sync.query_item(np.int64(7)))
        with pytest.raises(KeyError, match=r"'absent' is not a key of .*v2\.pkl"):
            ds.sync.query_item("absent")
        with pytest.raises(KeyError, match="unhashable"):
            ds.sync.query_item(["text"])
        with pytest.raises(KeyError):
            ds.sync.query_item(7.0)  # keys compare by their pickle: 7.0 is not 7


def test_arrays_are_aligned_and_writable(path: Path) -> None:
    with PickledDataset(path) as ds:
        for key in (Key("k", 7), 7, -3):
            item = ds.sync.query_item(key)
            for array in item.values() if isinstance(item, dict) else [item]:
                assert array.flags.aligned
                assert array.flags.writeable


def test_header_and_footer_are_as_documented(path: Path) -> None:
    data = path.read_bytes()
    magic, version, flags, algorithm, crc = HEADER2.unpack_from(data)
    csum = checksum_function(algorithm)
    assert csum is not None
    assert (magic, version, flags) == (b"\x89MLWDS\r\n", 2, 0)
    assert crc == csum(data[:60])
    assert data[len(data) - FOOTER_SIZE:len(data) - FOOTER_SIZE + 64] == data[:64]  # the copy
    fields = FOOTER.unpack_from(data, len(data) - FOOTER_SIZE + 64)
    index_offset, count = fields[:2]
    assert count == len(ITEMS)
    # First key and flags: the keys are not a range; an item holds a mapped
    # array, so the checksums of the bytes around mapped arrays are kept.
    assert fields[7:9] == (0, _format2.UNMAPPED_SUMS)
    assert fields[-1] == b"MLWDSEND"
    assert fields[-2] == csum(data[len(data) - FOOTER_SIZE:len(data) - 12])
    # Entries tile the data region: each span ends where the next begins.
    offsets = [struct.unpack_from("<Q", data, index_offset + 16 * i)[0] for i in range(count)]
    assert offsets[0] == 64
    assert offsets == sorted(offsets)
    with PickledDataset(path) as ds:
        index = ds._reader.index
        total = 0
        for number in range(count):
            offset, span, _, _, item_crc = index.entry(number)
            assert item_crc == csum(data[offset:offset + span])
            total += span
        assert 64 + total == index_offset


async def test_small_item_overhead_is_at_most_32_bytes_plus_the_key(tmp_path: Path) -> None:
    items = small_items(4000)
    target = tmp_path / "small.pkl"
    await PickledDataset.create(DictDataset(items), target)
    payload = 0
    keys = 0
    for key, item in items.items():
        payload += len(_format2_pickle(item))
        keys += len(key_bytes(key))
    overhead = (target.stat().st_size - payload - keys) / len(items)
    assert overhead <= 32, overhead


def _format2_pickle(item: Any) -> bytes:
    """The pickle and raw buffers of an item, without padding."""
    import io
    import pickle

    from mlworkflow_async._store._format import ItemPickler

    out = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    ItemPickler(out, 5, buffer_callback=buffers.append).dump(item)
    return out.getvalue() + b"".join(bytes(b.raw()) for b in buffers)


async def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    class Twice(DictDataset[Any, Any]):
        def yield_keys(self) -> list[Any]:
            return ["a", "b", "a"]

    target = tmp_path / "dup.pkl"
    with pytest.raises(ValueError, match="key 'a' appears twice"):
        await PickledDataset.create(Twice({"a": 1, "b": 2}), target)
    assert not target.exists()


def test_hash_collisions_are_resolved_by_comparing_bytes(tmp_path: Path) -> None:
    # At a load of 0.8, many keys are found past their home slot. The keys are
    # written in descending order, so that none is found by its place in a range.
    items = {i: i * i for i in reversed(range(5000))}
    target = tmp_path / "many.pkl"
    write_file(target, items)
    with PickledDataset(target) as ds:
        keys = list(range(0, 5000, 7))
        assert ds.sync.query_items(keys) == [k * k for k in keys]
        for absent in (-1, 5000, "0", (0,)):
            with pytest.raises(KeyError):
                ds.sync.query_item(absent)


PLAIN: dict[Any, Any] = {
    0: 0, 1: -(10**30), 255: 2.5, 256: "text", 65535: b"raw", 65536: True, -1: None,
    2**31 - 1: "", -(2**31): b"", 7: b"x" * 200_000,  # a large pickle, written as it is
}


def _write_chunks(path: Path, chunks: list[dict[Any, Any]]) -> None:
    """A format 2 file written one given chunk per ``encode`` call."""
    sink = AtomicFile(str(path))
    sink.write([_format2.header2()])
    encoder = _format2.Encoder2(str(path))
    for chunk in chunks:
        sink.write(encoder.encode(list(chunk), list(chunk.values())))
    encoder.finish(None, sink.write)
    sink.commit()


def test_plain_items_and_int_keys_of_every_width_read_back(tmp_path: Path) -> None:
    # Items the pickler writes itself, and 32-bit int keys, are encoded a chunk at a
    # time; a key past 32 bits or an item needing a reducer sends its chunk the
    # general way. Every item keeps its value and its type.
    from mlworkflow_async.__main__ import main

    chunks = [PLAIN, {2**40: "wide key", -(2**31) - 1: 1}, {"str key": 3, 9: np.arange(3)}, {}]
    target = tmp_path / "plain.pkl"
    _write_chunks(target, chunks)
    items = {key: item for chunk in chunks for key, item in chunk.items()}
    with PickledDataset(target) as ds:
        assert ds.sync.keys.all() == list(items)
        for key, item in zip(items, ds.sync.query_items(list(items)), strict=True):
            assert_same(items[key], item)
            assert type(item) is type(items[key])
    assert main(["verify", str(target)]) == 0


@pytest.mark.parametrize("safe", [False, True])
def test_chunks_of_int_items_read_back_as_ints(tmp_path: Path, safe: bool) -> None:
    # A chunk of 32-bit int items is spelled in numpy passes (without the pickler's
    # frame); an int past 32 bits, or a bool among them, sends its chunk the usual
    # way. Each reads back as the same int, in either unpickler.
    from mlworkflow_async.__main__ import main

    widths = [0, 1, 255, 256, 65535, 65536, -1, -256, 2**31 - 1, -(2**31)]
    chunks = [
        {i: value for i, value in enumerate(widths)},
        {100: 2**31, 101: 5},  # past 32 bits
        {200: True, 201: 3},  # a bool is no int item here
    ]
    target = tmp_path / "ints.pkl"
    _write_chunks(target, chunks)
    items = {key: item for chunk in chunks for key, item in chunk.items()}
    with PickledDataset(target, safe=safe) as ds:
        got = ds.sync.query_items(list(items))
    assert got == list(items.values())
    assert [type(item) for item in got] == [type(item) for item in items.values()]
    assert main(["verify", str(target)]) == 0


def test_pickles_too_long_for_an_entry_use_the_extended_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An entry holds a pickle's length in 30 bits; longer pickles (over 1 GiB) get a
    # row of the extended table. A smaller limit exercises both encoders.
    monkeypatch.setattr(_format2, "LOW", 63)
    chunks = [{0: b"a" * 100, 1: "short"}, {2: {"d": "b" * 100}, 3: [1]}]
    target = tmp_path / "long.pkl"
    _write_chunks(target, chunks)
    with PickledDataset(target) as ds:
        assert ds.sync.query_items([0, 1, 2, 3]) == [b"a" * 100, "short", {"d": "b" * 100}, [1]]
        assert ds._reader.index.footer.ext_count == 2


async def test_batches_of_large_arrays_are_read_into_place(tmp_path: Path) -> None:
    arrays = {i: np.full((64, 1024), i, np.float32) for i in range(10)}  # 256 KB each
    target = tmp_path / "arrays.pkl"
    await PickledDataset.create(DictDataset(arrays), target)
    async with await PickledDataset.open(target) as ds:
        reader = ds._reader
        assert isinstance(reader, Reader2)
        keys = [3, 1, 4, 1, 5, 9, 2, 6]
        entries = reader.locate(keys)
        size = reader.into_place_plan(entries)
        assert size == 64 * 1024 * 4
        batch = await reader.query_batch_into_place(keys, entries, size)
        np.testing.assert_array_equal(batch, np.stack([arrays[k] for k in keys]))
        assert batch.flags.c_contiguous
        assert batch.flags.writeable
        collated = await ds.query_batch(keys, _collate.DEFAULT_COLLATE)
        np.testing.assert_array_equal(collated, batch)
        calls: list[int] = []
        into_place = reader.query_batch_into_place

        async def counted(*args: Any) -> Any:
            calls.append(len(args[0]))
            return await into_place(*args)

        reader.query_batch_into_place = counted  # type: ignore[method-assign]
        got = [batch async for _, batch in ds.batches(4, keys=keys)]
        assert calls == [4, 4]  # batches() reads them into place too
        np.testing.assert_array_equal(np.concatenate(got), np.stack([arrays[k] for k in keys]))


async def test_batches_held_by_the_user_keep_their_data(tmp_path: Path) -> None:
    # Batch memory is recycled, but only once nothing views it any more.
    arrays = {i: np.full((64, 1024), i, np.float32) for i in range(12)}
    target = tmp_path / "arrays.pkl"
    await PickledDataset.create(DictDataset(arrays), target)
    async with await PickledDataset.open(target) as ds:
        kept = []
        async for keys, batch in ds.batches(2, keys=list(range(12))):
            kept.append((keys, batch[1][3:5].reshape(-1)))  # a view of a view, batch dropped
        for keys, row in kept:
            np.testing.assert_array_equal(row, np.full(2 * 1024, keys[1], np.float32))
        first = await ds.query(list(range(4)))
        address = first.ctypes.data
        del first  # the buffer comes back...
        later = await ds.query(list(range(4, 8)))
        assert later.ctypes.data == address  # ...and the next batch of its size reuses it
        np.testing.assert_array_equal(later, np.stack([arrays[k] for k in range(4, 8)]))


def test_batch_buffers_are_taken_back_only_after_their_last_view() -> None:
    pool = BatchBuffers(keep=1)
    a = pool.take(64)
    view = a.reshape(8, 8)[2:].view(np.int32)  # derived views keep the batch alive
    address = a.ctypes.data
    del a
    gc.collect()
    b = pool.take(64)
    assert b.ctypes.data != address  # still viewed: not handed out again
    view[:] = 7
    b[:] = 0
    assert (view == 7).all()
    del view
    gc.collect()
    assert pool.take(64).ctypes.data == address  # no view left: recycled
    pool.close()
    del b
    gc.collect()
    assert pool._held == 0  # a closed pool keeps nothing


async def test_into_place_gives_up_on_items_that_are_not_plain_arrays(tmp_path: Path) -> None:
    items = {0: np.zeros(100_000), 1: np.zeros(100_000).view(Wrapped)}
    target = tmp_path / "mixed.pkl"
    await PickledDataset.create(DictDataset(items), target)
    async with await PickledDataset.open(target) as ds:
        reader = ds._reader
        entries = reader.locate([0, 1])
        size = reader.into_place_plan(entries)
        if size is not None:
            assert await reader.query_batch_into_place([0, 1], entries, size) is None


async def test_a_damaged_array_in_a_batch_names_its_key(tmp_path: Path) -> None:
    arrays = {i: np.full(100_000, i, np.float64) for i in range(4)}
    target = tmp_path / "arrays.pkl"
    await PickledDataset.create(DictDataset(arrays), target)
    with PickledDataset(target) as ds:
        offset, span, *_ = ds._reader.index.locate(2)
    data = bytearray(target.read_bytes())
    data[offset + span - 100] ^= 1
    target.write_bytes(bytes(data))
    async with await PickledDataset.open(target) as ds:
        reader = ds._reader
        entries = reader.locate([0, 1, 2, 3])
        size = reader.into_place_plan(entries)
        assert size is not None
        with pytest.raises(CorruptFileError, match=r"item 2 .*checksum"):
            await reader.query_batch_into_place([0, 1, 2, 3], entries, size)


def test_verify_copied_skips_hashing_mapped_arrays_only(tmp_path: Path) -> None:
    items = {"big": np.ones(400_000), "small": np.arange(10)}
    target = tmp_path / "policy.pkl"
    write_file(target, items)
    with PickledDataset(target) as ds:
        big = ds._reader.index.locate("big")
        small = ds._reader.index.locate("small")
    data = bytearray(target.read_bytes())
    data[big[0] + big[1] - 8] ^= 0x10  # inside the mapped array
    data[small[0] + small[1] - 4] ^= 0x10
    target.write_bytes(bytes(data))
    with PickledDataset(target, verify="copied") as ds:
        assert ds.sync.query_item("big").shape == (400_000,)  # not hashed: the policy's cost
        with pytest.raises(CorruptFileError, match="'small'"):
            ds.sync.query_item("small")
    with PickledDataset(target) as ds, pytest.raises(CorruptFileError, match="'big'"):
        ds.sync.query_item("big")
    with pytest.raises(ValueError, match="verify"):
        PickledDataset(target, verify="sometimes")


def test_format_1_is_still_written_on_request(tmp_path: Path) -> None:
    target = tmp_path / "v1.pkl"
    write_file(target, {"a": 1}, version=1)
    with PickledDataset(target) as ds:
        assert ds.format_version == 1
        assert ds.sync.query_item("a") == 1
    with pytest.raises(ValueError, match="format_version"):
        asyncio.run(PickledDataset.create(DictDataset({"a": 1}), tmp_path / "x", format_version=3))


def test_a_file_truncated_to_its_header_is_corrupt(path: Path) -> None:
    os.truncate(path, 64)
    with pytest.raises(CorruptFileError, match="truncated"):
        PickledDataset(path)


@pytest.mark.parametrize("algorithm", [_checksum.ZLIB_CRC32, _checksum.CRC32C])
def test_short_checksums_are_the_checksums_of_each_piece(algorithm: int) -> None:
    # Keys are hashed a byte position at a time over a whole chunk: the hashes must
    # be those a lookup computes, one key at a time.
    csum = checksum_function(algorithm)
    if csum is None:
        pytest.skip("crc32c is not installed")
    rng = np.random.default_rng(5)
    for _ in range(50):
        lengths = rng.integers(0, _checksum.SHORT + 1, size=int(rng.integers(1, 80)))
        pieces = [rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes() for n in lengths]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        sums = _checksum.short_checksums(algorithm, b"".join(pieces), bounds)
        assert sums is not None
        assert sums.tolist() == [csum(piece) for piece in pieces]
    assert _checksum.short_checksums(algorithm, b"x" * 17, np.array([0, 17])) is None


def test_default_algorithm_is_crc32c_when_installed() -> None:
    from mlworkflow_async._store import _checksum

    assert (_checksum.CRC32C if _checksum.HAVE_CRC32C else 1) == _checksum.DEFAULT
    assert _format2.header2()[:8] == b"\x89MLWDS\r\n"


def test_convert_upgrades_format_1_and_verify_checks_every_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlworkflow_async.__main__ import main

    old, new = tmp_path / "v1.pkl", tmp_path / "v2.pkl"
    items = {"big": np.arange(300_000, dtype=np.float32), "small": [1, 2]}
    write_file(old, items, {"from": "v1"}, version=1)
    assert main(["convert", str(old), str(new)]) == 0
    with PickledDataset(new) as ds:
        assert ds.format_version == 2
        assert ds.context == {"from": "v1"}
        assert_same(items["big"], ds.sync.query_item("big"))
        offset, span, *_ = ds._reader.index.locate("big")
    assert main(["verify", str(new)]) == 0
    assert "OK: all 2 items" in capsys.readouterr().out
    data = bytearray(new.read_bytes())
    data[offset + span - 1000] ^= 0x20  # inside the mapped array
    new.write_bytes(bytes(data))
    assert main(["verify", str(new)]) == 1
    assert "BROKEN: item 'big'" in capsys.readouterr().out
    assert main(["info", str(new)]) == 0
    assert "CRC-32" in capsys.readouterr().out


def _as_first_layout(data: bytes) -> bytes:
    """The same file with the footer written before the first key and flags existed."""
    at = len(data) - FOOTER_SIZE
    fields = FOOTER.unpack_from(data, at + 64)
    csum = checksum_function(HEADER2.unpack_from(data)[3])
    assert csum is not None
    body = data[at:at + 64] + FIRST_FOOTER.pack(*fields[:7], *fields[9:])
    crc = csum(body[:FIRST_FOOTER_SIZE - 12])
    return data[:at] + body[:FIRST_FOOTER_SIZE - 12] + struct.pack("<I", crc) + b"MLWDSEND"


@pytest.mark.parametrize("keys", ["indices", "named"])
def test_files_with_the_first_footer_layout_still_read(tmp_path: Path, keys: str) -> None:
    # Format 2 files written before the footer held the first key and flags: read
    # locally and remotely, through the hash table (their keys are not declared a
    # range), and checked whole by `verify`.
    import fsspec

    from mlworkflow_async.__main__ import main

    items = {i if keys == "indices" else Key("k", i): {"x": np.full(3, i), "i": i}
             for i in range(300)}
    path = tmp_path / "first.pkl"
    write_file(path, items)
    path.write_bytes(_as_first_layout(path.read_bytes()))
    order = list(items)[::-7]
    with PickledDataset(path) as ds:
        assert ds._reader.index.footer.first is None
        for key, item in zip(order, ds.sync.query_items(order), strict=True):
            assert item["i"] == items[key]["i"]
        assert ds.sync.keys.all() == list(items)
    assert main(["verify", str(path)]) == 0
    fsspec.filesystem("memory").pipe_file(f"/first/{keys}.pkl", path.read_bytes())

    async def remote_read() -> list[Any]:
        async with await PickledDataset.open(f"memory://first/{keys}.pkl") as remote:
            return await remote.query_items(order)

    for key, item in zip(order, asyncio.run(remote_read()), strict=True):
        assert item["i"] == items[key]["i"]
    # Damaged, such a footer is refused as any other.
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="footer is damaged"):
        PickledDataset(path)
