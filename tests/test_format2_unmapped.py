"""Format 2: the bytes around mapped arrays are checked even when the arrays are not.

``verify="copied"`` does not hash arrays of 1 MiB or more; the pickle, the
padding and the smaller arrays of their items are checked against the
checksum the file keeps of them (footer flag 2, part 9).
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import DictDataset, PickledDataset
from mlworkflow_async._store import _format2
from mlworkflow_async._store._checksum import checksum_function
from mlworkflow_async._store._format2 import FOOTER, FOOTER_SIZE, HEADER2
from mlworkflow_async.exceptions import CorruptFileError

from ._pickled_util import write_file

ITEMS: dict[Any, Any] = {
    "one": {"label": "cat", "x": np.ones(300_000, dtype=np.float32)},  # one mapped array
    "several": {"label": "dog", "small": np.arange(40, dtype=np.int64),
                "x": np.full(300_000, 2.0, dtype=np.float32)},
    "plain": {"label": "eel", "x": np.arange(10)},
}


def flip(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)[0]
        os.pwrite(fd, bytes([byte ^ 0x02]), offset)
    finally:
        os.close(fd)


def places(path: Path, key: str) -> dict[str, int]:
    """Offsets in the file of bytes of ``key``'s item: its label, padding, small array."""
    with PickledDataset(path) as ds:
        offset, _span, plen, buffers = ds._reader.index.locate(key)[:4]
    assert buffers is not None
    data = path.read_bytes()
    label = data.index(ITEMS[key]["label"].encode(), offset, offset + plen)
    found = {"label": label, "padding": offset + buffers[-1][0] - 1}
    if len(buffers) > 1:
        found["small array"] = offset + buffers[0][0] + 3
    return found


async def read(path: Path, key: str, *, mmap: bool, inline: bool, verify: str) -> Any:
    async with await PickledDataset.open(path, mmap=mmap, verify=verify) as ds:
        ds._reader.inline = ds._reader.inline and inline
        return await ds.query_item(key)


@pytest.mark.parametrize("inline", [True, False], ids=["loop", "thread"])
@pytest.mark.parametrize("mmap", [False, True], ids=["private", "mmap"])
@pytest.mark.parametrize(("key", "where"), [
    ("one", "label"), ("one", "padding"), ("several", "label"), ("several", "small array"),
])
def test_copied_checks_the_bytes_around_mapped_arrays(
    tmp_path: Path, key: str, where: str, mmap: bool, inline: bool
) -> None:
    path = tmp_path / "items.pkl"
    write_file(path, ITEMS)
    flip(path, places(path, key)[where])
    with pytest.raises(CorruptFileError, match=rf"items\.pkl.*item '{key}' is damaged"):
        asyncio.run(read(path, key, mmap=mmap, inline=inline, verify="copied"))
    # The other items still read, their mapped arrays unhashed.
    other = "several" if key == "one" else "one"
    got = asyncio.run(read(path, other, mmap=mmap, inline=inline, verify="copied"))
    assert got["label"] == ITEMS[other]["label"]


def test_all_checks_the_rest_at_later_reads_too(tmp_path: Path) -> None:
    path = tmp_path / "items.pkl"
    write_file(path, ITEMS)
    label = places(path, "one")["label"]

    async def main() -> None:
        async with await PickledDataset.open(path) as ds:
            assert (await ds.query_item("one"))["label"] == "cat"  # hashed whole, once
            flip(path, label)  # changed in place while open (never do this)
            with pytest.raises(CorruptFileError, match="item 'one' is damaged"):
                await ds.query_item("one")

    asyncio.run(main())


def test_the_checksums_are_kept_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "items.pkl"
    write_file(path, ITEMS)
    data = path.read_bytes()
    algorithm = HEADER2.unpack_from(data)[3]
    csum = checksum_function(algorithm)
    assert csum is not None
    fields = FOOTER.unpack_from(data, len(data) - FOOTER_SIZE + HEADER2.size)
    assert fields[8] == _format2.UNMAPPED_SUMS
    with PickledDataset(path) as ds:
        index = ds._reader.index
        keys = ds.yield_keys()
        footer = index.footer
        assert footer.unmapped == footer.context + footer.context_length
        assert footer.blocks == footer.unmapped + 4 * len(keys)
        part = np.frombuffer(
            data, "<u4", len(keys), footer.index_offset + footer.unmapped
        ).tolist()
        for number, key in enumerate(keys):
            offset, span, _, buffers, _ = index.entry(number)
            unmapped = index.unmapped_sum(number)
            assert index.number_at(offset) == number
            if key == "plain":
                assert part[number] == unmapped == 0
                continue
            assert buffers is not None
            expected = 0
            done = 0
            for a, b in buffers:  # everything but the mapped array
                expected = csum(data[offset + done:offset + a], expected)
                if b - a < _format2.MAP_THRESHOLD:
                    expected = csum(data[offset + a:offset + b], expected)
                done = b
            assert unmapped == part[number] == expected
            assert done == span


def test_files_without_items_holding_mapped_arrays_keep_the_flag_clear(tmp_path: Path) -> None:
    path = tmp_path / "small.pkl"
    write_file(path, {"plain": ITEMS["plain"]})
    data = path.read_bytes()
    assert FOOTER.unpack_from(data, len(data) - FOOTER_SIZE + HEADER2.size)[8] == 0


def test_files_written_without_the_checksums_are_checked_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As written before part 9 existed: copied then hashes such items whole.
    finish = _format2.Encoder2.finish

    def without(self: _format2.Encoder2, *args: Any) -> None:
        self._unmapped.clear()
        finish(self, *args)

    monkeypatch.setattr(_format2.Encoder2, "finish", without)
    path = tmp_path / "older.pkl"
    asyncio.run(PickledDataset.create(DictDataset(ITEMS), path))
    data = path.read_bytes()
    assert FOOTER.unpack_from(data, len(data) - FOOTER_SIZE + HEADER2.size)[8] == 0
    with PickledDataset(path) as ds:
        assert not ds._reader.index.keeps_unmapped
    flip(path, places_without_checksums(path, "one"))
    for inline in (True, False):
        with pytest.raises(CorruptFileError, match="item 'one' is damaged"):
            asyncio.run(read(path, "one", mmap=False, inline=inline, verify="copied"))


def places_without_checksums(path: Path, key: str) -> int:
    with PickledDataset(path) as ds:
        offset, _, plen, *_ = ds._reader.index.locate(key)
    return path.read_bytes().index(ITEMS[key]["label"].encode(), offset, offset + plen)


def set_unmapped(path: Path, number: int, value: int) -> None:
    """Rewrite entry ``number`` of part 9, every checksum over it made right (a crafted file)."""
    data = bytearray(path.read_bytes())
    csum = checksum_function(HEADER2.unpack_from(data)[3])
    assert csum is not None
    with PickledDataset(path) as ds:
        footer = ds._reader.index.footer
    region = footer.index_offset
    struct.pack_into("<I", data, region + footer.unmapped + 4 * number, value)
    for block in range(footer.block_count):
        start = region + block * footer.block
        piece = data[start:min(start + footer.block, region + footer.blocks)]
        struct.pack_into("<I", data, region + footer.blocks + 4 * block, csum(bytes(piece)))
    sums = region + footer.blocks
    at = len(data) - FOOTER_SIZE + HEADER2.size
    fields = list(FOOTER.unpack_from(data, at))
    fields[9] = csum(bytes(data[sums:sums + 4 * footer.block_count]))
    FOOTER.pack_into(data, at, *fields)
    end = len(data) - 12
    data[end:end + 4] = struct.pack("<I", csum(bytes(data[len(data) - FOOTER_SIZE:end])))
    path.write_bytes(data)


def test_every_reader_and_verify_hold_items_to_the_kept_checksum(
    tmp_path: Path, capsys: Any
) -> None:
    from mlworkflow_async.__main__ import main

    path = tmp_path / "items.pkl"
    write_file(path, ITEMS)
    assert main(["verify", str(path)]) == 0
    with PickledDataset(path) as ds:
        number = ds.yield_keys().index("several")
        value = ds._reader.index.unmapped_sum(number)
    assert value is not None
    set_unmapped(path, number, value ^ 1)  # the item's own bytes and span checksum intact
    capsys.readouterr()
    assert main(["verify", str(path)]) == 1
    assert "item 'several' is damaged" in capsys.readouterr().out
    for verify in ("all", "copied"):
        for inline in (True, False):
            with pytest.raises(CorruptFileError, match="item 'several' is damaged"):
                asyncio.run(read(path, "several", mmap=False, inline=inline, verify=verify))
