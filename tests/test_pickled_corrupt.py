"""Bad files raise one documented error naming the file; never garbage, never a hang."""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import mlworkflow
import numpy as np
import pytest

from mlworkflow_async import (
    CorruptFileError,
    DictDataset,
    PickledDataset,
    PickledFileError,
    UnsupportedVersionError,
)
from mlworkflow_async._store._checksum import checksum_function
from mlworkflow_async._store._format import TRAILER, TRAILER_SIZE
from mlworkflow_async._store._format2 import FOOTER, FOOTER_SIZE, HEADER2
from mlworkflow_async.exceptions import KeyClassNotFoundError

from ._pickled_util import Key, assert_same, small_items, write_file, write_original_file

ITEMS = {f"k{i}": {"v": np.arange(i, dtype=np.int16), "s": "x" * i} for i in range(12)}


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.pkl"
    write_file(path, ITEMS, {"note": "ctx"}, version=1)
    return path


@pytest.fixture
def legacy_file(tmp_path: Path) -> Path:
    path = tmp_path / "legacy.pkl"
    write_original_file(path, ITEMS, {"note": "ctx"})
    return path


def rewrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def damage(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))


def test_empty_file(tmp_path: Path) -> None:
    path = rewrite(tmp_path / "empty.pkl", b"")
    with pytest.raises(CorruptFileError, match=r"empty\.pkl.*empty") as info:
        PickledDataset(path)
    assert info.value.path == str(path)
    assert isinstance(info.value, PickledFileError)


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes(tmp_path: Path, seed: int) -> None:
    data = np.random.default_rng(seed).bytes(5000)
    if seed == 0:
        data = b"\x80\x04" + data  # looks like the start of an original file
    if seed == 1:
        data = data[:3]
    path = rewrite(tmp_path / "random.pkl", data)
    with pytest.raises(CorruptFileError, match=r"random\.pkl"):
        PickledDataset(path)


def test_truncated_at_every_point(good_file: Path, tmp_path: Path) -> None:
    data = good_file.read_bytes()
    for size in range(0, len(data), 3):
        path = rewrite(tmp_path / "cut.pkl", data[:size])
        with pytest.raises(CorruptFileError):
            PickledDataset(path)


def test_legacy_file_truncated_at_every_point(legacy_file: Path, tmp_path: Path) -> None:
    data = legacy_file.read_bytes()
    with PickledDataset(legacy_file) as whole:
        keys = list(whole.yield_keys())
    for size in range(0, len(data)):
        path = rewrite(tmp_path / "cut.pkl", data[:size])
        try:
            ds = PickledDataset(path)
        except CorruptFileError:
            continue
        # The original format has no end marker: cut right after its index,
        # a file only loses its optional context, and must read correctly.
        with ds:
            assert ds.context == {}
            assert list(ds.yield_keys()) == keys
            for key, item in zip(keys, asyncio.run(ds.query_items(keys)), strict=True):
                assert_same(ITEMS[key], item)


def test_unfinished_legacy_file(tmp_path: Path) -> None:
    class Failing(mlworkflow.DictDataset):  # type: ignore[misc]
        def query_item(self, key: Any) -> Any:
            if key == 5:
                raise RuntimeError("stop")
            return super().query_item(key)

    path = tmp_path / "unfinished.pkl"
    with pytest.raises(RuntimeError):
        mlworkflow.PickledDataset.create(Failing({i: i for i in range(10)}), str(path))
    with pytest.raises(CorruptFileError, match="did not finish"):
        PickledDataset(path)


def test_index_located_past_the_end(good_file: Path) -> None:
    data = bytearray(good_file.read_bytes())
    offset, length, crc, end = TRAILER.unpack_from(data, len(data) - TRAILER_SIZE)
    TRAILER.pack_into(data, len(data) - TRAILER_SIZE, offset + 10_000, length, crc, end)
    rewrite(good_file, bytes(data))
    with pytest.raises(CorruptFileError, match="index lies outside the file"):
        PickledDataset(good_file)


def rebuild_index(path: Path, change: Any) -> None:
    """Rewrite the index of ``path`` after ``change(index)``, with a valid checksum."""
    data = path.read_bytes()
    offset, length, _, end = TRAILER.unpack_from(data, len(data) - TRAILER_SIZE)
    index = pickle.loads(data[offset:offset + length])
    change(index)
    blob = pickle.dumps(index, 5)
    path.write_bytes(data[:offset] + blob + TRAILER.pack(offset, len(blob), zlib.crc32(blob), end))


def test_index_entry_pointing_past_the_end(good_file: Path) -> None:
    def push_last_item_out(index: dict[str, Any]) -> None:
        table = np.frombuffer(index["table"], dtype="<u8").reshape(-1, 4).copy()
        table[-1, 0] = 10**9
        index["table"] = table.tobytes()

    rebuild_index(good_file, push_last_item_out)
    with pytest.raises(CorruptFileError, match="places item 'k11' outside the data region"):
        PickledDataset(good_file)


@pytest.mark.parametrize(
    "change",
    [
        lambda index: index.pop("table"),
        lambda index: index.update(table=b"\x00" * 7),
        lambda index: index.update(keys=index["keys"][:-1]),
        lambda index: index.update(keys=["same"] * len(index["keys"])),
        lambda index: index.update(context=[1, 2]),
        lambda index: index.update(buffers=b""),
    ],
)
def test_malformed_index(good_file: Path, change: Any) -> None:
    rebuild_index(good_file, change)
    with pytest.raises(CorruptFileError, match=r"good\.pkl.*index"):
        PickledDataset(good_file)


def test_damaged_index_fails_its_checksum(good_file: Path) -> None:
    data = bytearray(good_file.read_bytes())
    offset = TRAILER.unpack_from(data, len(data) - TRAILER_SIZE)[0]
    data[offset + 20] ^= 0xFF
    rewrite(good_file, bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        PickledDataset(good_file)


@pytest.mark.parametrize("inline", [True, False])
async def test_damaged_item_names_its_key_and_file(good_file: Path, inline: bool) -> None:
    with PickledDataset(good_file) as ds:
        offset = ds._reader.entries["k7"][0]
    damage(good_file, offset, 0xFF)  # not a pickle opcode
    async with await PickledDataset.open(good_file) as ds:
        ds._reader.inline = inline  # the cached path, or the worker thread path
        with pytest.raises(CorruptFileError, match=r"item 'k7' of .*good\.pkl cannot be unpickled"):
            await ds.query_items(["k6", "k7", "k8"])
        assert_same(ITEMS["k8"], await ds.query_item("k8"))


async def test_damaged_legacy_item(legacy_file: Path) -> None:
    with PickledDataset(legacy_file) as ds:
        offset = ds._reader.entries["k3"][0]
    damage(legacy_file, offset + 2, 0xFE)
    async with await PickledDataset.open(legacy_file) as ds:
        with pytest.raises(CorruptFileError, match="item 'k3'"):
            await ds.query_item("k3")


@pytest.mark.parametrize("mmap", [False, True])
async def test_file_truncated_after_opening(tmp_path: Path, mmap: bool) -> None:
    items = {"small": small_items(3), "big": np.ones(400_000)}
    path = tmp_path / "shrinks.pkl"
    await PickledDataset.create(DictDataset(items), path)
    async with await PickledDataset.open(path, mmap=mmap) as ds:
        os.truncate(path, 100)
        for key in ("small", "big"):
            with pytest.raises(CorruptFileError, match="past the end of the file"):
                await ds.query_item(key)


def test_a_directory_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match="Is a directory") as info:
        PickledDataset(tmp_path)
    assert info.value.filename == str(tmp_path)


def test_missing_file_is_a_plain_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PickledDataset(tmp_path / "absent.pkl")


def test_errors_survive_pickling(good_file: Path) -> None:
    error = CorruptFileError("bad things", str(good_file))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is CorruptFileError
    assert copy.path == str(good_file)
    assert str(copy) == "bad things"


def test_header_only_and_partial_magic(tmp_path: Path, good_file: Path) -> None:
    data = good_file.read_bytes()
    for size in (5, 64, 64 + TRAILER_SIZE - 1):
        path = rewrite(tmp_path / "short.pkl", data[:size])
        with pytest.raises(CorruptFileError, match="truncated"):
            PickledDataset(path)
    assert struct.unpack_from("<I", data, 8)[0] == 1


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize(("field", "value"), [
    ("offset", 2**63 + 64), ("span", 2**64 - 1), ("pickle_length", 2**63 + 5),
    ("buffer_start", 2**63), ("buffer_stop", 2**64 - 8),
])
def test_index_integers_too_large_for_any_file(
    good_file: Path, mmap: bool, field: str, value: int
) -> None:
    def enlarge(index: dict[str, Any]) -> None:
        if field.startswith("buffer"):
            rows = np.frombuffer(index["buffers"], dtype="<u8").reshape(-1, 2).copy()
            rows[-1, int(field == "buffer_stop")] = value
            index["buffers"] = rows.tobytes()
        else:
            table = np.frombuffer(index["table"], dtype="<u8").reshape(-1, 4).copy()
            table[-1, ["offset", "span", "pickle_length"].index(field)] = value
            index["table"] = table.tobytes()

    rebuild_index(good_file, enlarge)
    with pytest.raises(CorruptFileError, match=r"good\.pkl.*too large for any file"):
        PickledDataset(good_file, mmap=mmap)


@pytest.mark.parametrize(("offset", "value"), [(12, 1), (15, 0x80), (16, 1), (63, 0xFF)])
def test_unknown_header_flags_or_reserved_bytes(good_file: Path, offset: int, value: int) -> None:
    damage(good_file, offset, value)  # flags are bytes 12-15, reserved bytes 16-63
    with pytest.raises(UnsupportedVersionError, match=r"good\.pkl sets header flags") as info:
        PickledDataset(good_file)
    assert info.value.path == str(good_file)


def _set_header_bytes(path: Path, offset: int, value: int, copy_too: bool) -> None:
    """Change one byte of a format 2 header with its checksums made right again:
    a file a newer writer could have written (or, without the copy, a damaged one)."""
    data = bytearray(path.read_bytes())
    csum = checksum_function(HEADER2.unpack_from(data)[3])
    assert csum is not None
    starts = [0, len(data) - FOOTER_SIZE] if copy_too else [0]
    for start in starts:
        data[start + offset] = value
        data[start + 60:start + 64] = struct.pack("<I", csum(bytes(data[start:start + 60])))
    end = len(data) - 12
    data[end:end + 4] = struct.pack("<I", csum(bytes(data[len(data) - FOOTER_SIZE:end])))
    path.write_bytes(data)


@pytest.mark.parametrize(("offset", "value"), [(12, 1), (15, 0x80), (20, 1), (59, 0xFF)])
def test_format2_unknown_header_flags_or_reserved_bytes(
    tmp_path: Path, offset: int, value: int
) -> None:
    path = tmp_path / "two.pkl"
    write_file(path, ITEMS)
    _set_header_bytes(path, offset, value, copy_too=True)
    with pytest.raises(UnsupportedVersionError, match=r"two\.pkl sets header flags") as info:
        PickledDataset(path)
    assert info.value.path == str(path)
    # Changed in the header alone, the file disagrees with itself: damaged.
    write_file(path, ITEMS)
    _set_header_bytes(path, offset, value, copy_too=False)
    with pytest.raises(CorruptFileError, match="header and the copy in its footer differ"):
        PickledDataset(path)


def _set_footer_range(path: Path, first: int, flags: int) -> None:
    """Rewrite the first-key and flags fields of a format 2 footer, its checksum made right."""
    data = bytearray(path.read_bytes())
    csum = checksum_function(HEADER2.unpack_from(data)[3])
    assert csum is not None
    at = len(data) - FOOTER_SIZE + HEADER2.size
    fields = list(FOOTER.unpack_from(data, at))
    fields[7:9] = [first, flags]
    FOOTER.pack_into(data, at, *fields)
    end = len(data) - 12
    data[end:end + 4] = struct.pack("<I", csum(bytes(data[len(data) - FOOTER_SIZE:end])))
    path.write_bytes(data)


def test_format2_unknown_footer_flags(tmp_path: Path) -> None:
    path = tmp_path / "two.pkl"
    write_file(path, {i: i for i in range(10)})
    _set_footer_range(path, 0, 1 | 4)  # bit 2 is known (UNMAPPED_SUMS)
    with pytest.raises(UnsupportedVersionError, match=r"two\.pkl sets footer flags") as info:
        PickledDataset(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("first", [2**31 - 5, -(2**31) - 1])
def test_format2_footer_range_past_32_bits(tmp_path: Path, first: int) -> None:
    path = tmp_path / "two.pkl"
    write_file(path, {i: i for i in range(10)})
    _set_footer_range(path, first, 1)
    with pytest.raises(CorruptFileError, match=r"footer is malformed \(keys from"):
        PickledDataset(path)


def test_format2_footer_range_that_its_keys_deny(tmp_path: Path, capsys: Any) -> None:
    # A footer that declares a range its key bytes do not spell (a crafted file,
    # with every checksum right): readers take the footer's word, one answer for
    # every question, and `verify`, which checks the key parts, refuses the file.
    from mlworkflow_async.__main__ import main

    path = tmp_path / "two.pkl"
    keys = ["a", "b", "c"]
    write_file(path, {key: i for i, key in enumerate(keys)})
    _set_footer_range(path, 10, 1)
    with PickledDataset(path) as ds:
        assert ds.sync.keys.all() == [10, 11, 12]
        assert ds.sync.query_items([12, 10]) == [2, 0]
        for key in ("a", 13):
            with pytest.raises(KeyError):
                ds.sync.query_item(key)
        assert [key for key, _ in ds.sync.batches(2, collate_fn=list)] == [[10, 11], [12]]
    assert main(["verify", str(path)]) == 1
    assert "declares the keys 10 to 12, which its key bytes do not spell" in (
        capsys.readouterr().out
    )


def test_key_class_that_cannot_be_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "vanishing_keys.py"
    module.write_text("from typing import NamedTuple\n\n"
                      "class Id(NamedTuple):\n    n: int\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_keys  # type: ignore[import-not-found]

    path = tmp_path / "ids.pkl"
    write_file(path, {vanishing_keys.Id(1): "one"}, version=1)
    lazy = tmp_path / "ids2.pkl"
    write_file(lazy, {vanishing_keys.Id(1): "one"})
    monkeypatch.delitem(sys.modules, "vanishing_keys")
    sys.path.remove(str(tmp_path))  # as in a process that never had it
    with pytest.raises(KeyClassNotFoundError, match=r"ids\.pkl need the module "
                       r"'vanishing_keys'.*install or import") as info:
        PickledDataset(path)
    assert info.value.path == str(path)
    assert not isinstance(info.value, CorruptFileError)
    # Format 2 opens without unpickling keys: the same error comes when they are read.
    with PickledDataset(lazy) as opened, pytest.raises(
        KeyClassNotFoundError, match=r"ids2\.pkl need the module 'vanishing_keys'"
    ):
        opened.sync.keys.all()
    # Safe mode imports nothing: the class must be allowed, and then it is at hand.
    with PickledDataset(path, safe=True, allow=[vanishing_keys.Id]) as ds:
        assert list(ds.yield_keys()) == [vanishing_keys.Id(1)]


def test_key_class_missing_from_its_module(tmp_path: Path) -> None:
    path = tmp_path / "ids.pkl"
    write_file(path, {"a": 1}, version=1)

    def renamed(index: dict[str, Any]) -> None:
        index["keys"] = [Key("a", 1)]

    rebuild_index(path, renamed)
    data = path.read_bytes().replace(b"\x8c\x03Key", b"\x8c\x03Kez")
    offset, length, _, end = TRAILER.unpack_from(data, len(data) - TRAILER_SIZE)
    blob = data[offset:offset + length]
    path.write_bytes(data[:offset] + blob + TRAILER.pack(offset, length, zlib.crc32(blob), end))
    with pytest.raises(KeyClassNotFoundError, match=r"tests\._pickled_util\.Kez"):
        PickledDataset(path)
