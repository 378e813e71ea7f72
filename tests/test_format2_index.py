"""Format 2 opens in constant time: two reads, nothing built or unpickled per key.

Timings are left to the benchmarks; these tests check the structure that
makes opening independent of the number of items.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import PickledDataset
from mlworkflow_async._store._format2 import (
    HEADER2,
    Encoder2,
    header2,
    int_key_bytes,
    int_keys_bytes,
)
from mlworkflow_async._store._index2 import EAGER_BYTES, Index2
from mlworkflow_async._store._reads2 import open_index
from mlworkflow_async._store._safe_unpickler import make_loads
from mlworkflow_async._store._writes import AtomicFile
from mlworkflow_async.exceptions import CorruptFileError

from ._pickled_util import Key, write_file

UNPICKLED = 0


def _rebuild(value: int) -> Counted:
    global UNPICKLED
    UNPICKLED += 1
    return Counted(value)


class Counted(int):
    """A key type that counts how often it is unpickled."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _rebuild, (int(self),)


class FileSource:
    """A byte source over a local file that counts its requests."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.size = path.stat().st_size
        self._path = path
        self.requests: list[list[tuple[int, int]]] = []

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.requests.append(list(ranges))
        with open(self._path, "rb") as f:  # noqa: ASYNC230
            out = []
            for offset, length in ranges:
                f.seek(offset)
                out.append(f.read(length))
            return out


def big_file(folder: Path, n: int) -> Path:
    path = folder / f"n{n}.pkl"
    write_file(path, {Counted(i): i for i in range(n)})
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # An index larger than EAGER_BYTES, so that its blocks are checked lazily.
    return big_file(tmp_path_factory.mktemp("index"), 60_000)


@pytest.mark.parametrize("n", [10, 60_000])
def test_opening_through_a_source_takes_two_requests(tmp_path: Path, n: int) -> None:
    path = big_file(tmp_path, n)
    source = FileSource(path)
    head = path.read_bytes()[: HEADER2.size]
    index = asyncio.run(open_index(source, head, make_loads(False)))
    assert len(source.requests) == 2
    assert len(index) == n
    assert index.entry(index.find(_pickled(Counted(n - 1)), n - 1))[1] > 0


def _pickled(key: Any) -> bytes:
    from mlworkflow_async._store._format2 import key_bytes

    return key_bytes(key)


def test_keys_are_unpickled_only_when_asked(big: Path) -> None:
    before = UNPICKLED
    with PickledDataset(big) as ds:
        assert len(ds) == 60_000
        assert ds.sync.query_item(Counted(12_345)) == 12_345
        with pytest.raises(KeyError):
            ds.sync.query_item(12_345)  # a plain int pickles otherwise: not the same key
        assert before == UNPICKLED
        keys = ds.sync.keys.all()
        assert before + 60_000 == UNPICKLED
        assert list(keys[:3]) == [0, 1, 2]


def test_a_large_index_is_mapped_and_checked_block_by_block(big: Path) -> None:
    with PickledDataset(big) as ds:
        index = ds._reader.index
        assert isinstance(index, Index2)
        assert index.footer.blocks > EAGER_BYTES
        assert isinstance(index._region, memoryview)
        assert isinstance(index._buffer, __import__("mmap").mmap)
        assert sum(index._verified) == 0  # nothing per key, nothing per block at open
        ds.sync.query_item(Counted(777))
        # The slots probed, their entries and key bytes: a handful, whatever the size.
        assert 1 <= sum(index._verified) <= 16


def test_a_damaged_block_of_a_large_index_is_found_when_touched(tmp_path: Path) -> None:
    path = big_file(tmp_path, 60_000)
    with PickledDataset(path) as ds:
        f = ds._reader.index.footer
        at = f.index_offset + f.table + 1000 * f.width  # inside the hash table
    data = bytearray(path.read_bytes())
    data[at] ^= 0x04
    path.write_bytes(bytes(data))
    with PickledDataset(path) as ds:  # opening does not read that block
        failures = []
        for key in range(0, 60_000, 97):
            try:
                assert ds.sync.query_item(Counted(key)) == key
            except CorruptFileError as exc:
                failures.append(str(exc))
        assert failures
        assert all("index is damaged" in message for message in failures)
        with pytest.raises(CorruptFileError, match="index is damaged"):
            ds._reader.index.check_all()


@pytest.mark.parametrize("first", [0, 70_000, -5])
def test_a_range_of_int_keys_is_looked_up_by_subtraction(tmp_path: Path, first: int) -> None:
    # A file of indices (keys first, first + 1, ... in file order, as in a dataset
    # of indices or a shard of one) says so in its footer: each key is found at its
    # place, and only blocks of entries are read (no key offsets, key bytes, hash
    # table or fingerprints).
    n = 70_000
    path = tmp_path / "range.pkl"
    write_file(path, {i: -i for i in range(first, first + n)})
    with PickledDataset(path) as ds:
        index = ds._reader.index
        assert isinstance(index, Index2)
        f = index.footer
        assert f.first == first
        assert f.blocks > EAGER_BYTES  # checked lazily: the blocks touched are known
        keys = [first + k for k in (n - 1, 0, 1, *range(0, n, 997))]
        assert ds.sync.query_items(keys) == [-k for k in keys]
        assert ds.sync.query_item(np.int64(first + 5)) == -(first + 5)  # stored as an int
        rest = range(-(-f.key_offsets // f.block), f.context // f.block)
        assert len(rest) > 0
        assert not any(index._verified[number] for number in rest)
        for absent in (first - 1, first + n, 2**40, 3.5, str(first), (first,), True):
            with pytest.raises(KeyError, match="is not a key"):
                ds.sync.query_item(absent)
        # The keys are counted, not read.
        assert ds.sync.keys.all() == list(range(first, first + n))
        assert not any(index._verified[number] for number in rest)
        index.check_all()  # what `verify` runs: the key parts spell the range
        assert ds.sync.query_items(keys) == [-k for k in keys]


def test_lookups_stop_testing_block_flags_once_every_block_is_checked(tmp_path: Path) -> None:
    # A lazily checked index tests a flag per block it touches; once every block
    # has been checked (here by looking every key up), lookups go without.
    path = tmp_path / "named.pkl"
    keys = [Key("k" * 20, i) for i in range(30_000)]
    write_file(path, dict.fromkeys(keys, 0))
    with PickledDataset(path) as ds:
        index = ds._reader.index
        assert isinstance(index, Index2)
        assert index.footer.blocks > EAGER_BYTES
        assert index._lazy
        ds.sync.query_items(keys[:100])
        assert index._lazy
        assert not all(index._verified)
        ds.sync.query_items(keys[100:])
        assert not index._lazy
        assert all(index._verified)
        assert ds.sync.query_items(keys[::-997]) == [0] * len(keys[::-997])


def _footer_first(path: Path) -> int | None:
    with PickledDataset(path) as ds:
        index = ds._reader.index
        assert isinstance(index, Index2)
        return index.footer.first


@pytest.mark.parametrize(
    "keys",
    [
        [0, 1, 3],  # a gap
        [1, 0, 2],  # out of order
        [*range(300), 301],  # a gap in a later chunk
        [True, False],  # bools pickle as bools, not ints
        [2**31 - 1, 2**31],  # past 32 bits
        [0, 1, "2"],
        [0.0, 1.0],
    ],
)
def test_only_a_range_of_ints_is_declared_one(tmp_path: Path, keys: list[Any]) -> None:
    path = tmp_path / "keys.pkl"
    write_file(path, {key: i for i, key in enumerate(keys)})
    assert _footer_first(path) is None
    with PickledDataset(path) as ds:
        assert ds.sync.query_items(keys) == list(range(len(keys)))
        assert ds.sync.keys.all() == keys


def test_a_range_is_followed_across_chunks(tmp_path: Path) -> None:
    def write(path: Path, chunks: list[list[int]]) -> int | None:
        sink = AtomicFile(str(path))
        sink.write([header2()])
        encoder = Encoder2(str(path))
        for keys in chunks:
            sink.write(encoder.encode(keys, keys))
        encoder.finish(None, sink.write)
        sink.commit()
        return _footer_first(path)

    assert write(tmp_path / "a.pkl", [[7, 8], [9], [], [10, 11, 12]]) == 7
    assert write(tmp_path / "b.pkl", [[7, 8], [10, 11]]) is None  # the gap between chunks
    assert write(tmp_path / "c.pkl", [[7, 8], [9, 11, 10, 12]]) is None  # ends right, not between
    assert write(tmp_path / "d.pkl", []) is None
    with PickledDataset(tmp_path / "a.pkl") as ds:
        assert ds.sync.query_items([12, 7]) == [12, 7]


def test_int_keys_out_of_order_are_found_by_the_table(tmp_path: Path) -> None:
    keys = list(range(100))
    random.Random(0).shuffle(keys)
    path = tmp_path / "shuffled.pkl"
    write_file(path, {key: -key for key in keys})
    assert _footer_first(path) is None
    with PickledDataset(path) as ds:
        assert ds.sync.query_items(list(range(100))) == [-key for key in range(100)]
        assert ds.sync.query_items(keys[:10]) == [-key for key in keys[:10]]


_MEASURE_CREATE = """
import asyncio, gc, sys
from mlworkflow_async import DictDataset, PickledDataset

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))

n = int(sys.argv[2])
source = DictDataset({i: i for i in range(n)})
asyncio.run(PickledDataset.create(DictDataset({0: 0}), sys.argv[1] + ".warm"))
source.sync.keys.all()  # the source memoizes its keys as create lists them: part of the source
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak restarts from the current resident size
before = peak_kib()
asyncio.run(PickledDataset.create(source, sys.argv[1]))
print((peak_kib() - before) * 1024 / n)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_create_keeps_no_python_object_per_item(tmp_path: Path) -> None:
    n = 300_000
    path = tmp_path / "tiny.pkl"
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE_CREATE, str(path), str(n)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    per_item = float(done.stdout)
    assert per_item < 64, per_item
    with PickledDataset(path) as ds:
        assert ds.sync.query_item(n - 1) == n - 1


def test_an_empty_dataset_opens(tmp_path: Path) -> None:
    path = tmp_path / "empty.pkl"
    write_file(path, {})
    with PickledDataset(path) as ds:
        assert len(ds) == 0
        assert list(ds.sync.keys.all()) == []
        with pytest.raises(KeyError):
            ds.sync.query_item(0)


def test_int_keys_are_spelled_as_the_pickler_spells_them() -> None:
    # Lookups and writes spell int keys without pickling: the bytes must be the pickle's.
    def pickled(key: int) -> bytes:
        data = pickle.dumps(key, 5)
        return data[:2] + data[11:] if data[2] == 0x95 else data

    edges = [0, 1, 255, 256, 65535, 65536, -1, -255, -256, -65536, 2**31 - 1, 2**31,
             -(2**31), -(2**31) - 1, 2**63, -(2**63), 10**40, -(10**40)]
    rng = random.Random(5)
    samples = [rng.randrange(-(2**40), 2**40) for _ in range(2000)]
    keys = [*edges, *range(-1000, 70000, 7), *samples]
    for key in keys:
        assert int_key_bytes(key) == pickled(key), key
    # Whole chunks are spelled at once when every key fits 32 bits, else not at all.
    fitting = [key for key in keys if -(2**31) <= key < 2**31]
    joined = int_keys_bytes(fitting)
    assert joined is not None
    blob, bounds = joined
    assert len(bounds) == len(fitting) + 1
    assert bounds[0] == 0
    assert bounds[-1] == len(blob)
    assert [blob[a:b] for a, b in itertools.pairwise(bounds.tolist())] == list(
        map(pickled, fitting)
    )
    assert int_keys_bytes([*fitting[:10], 2**31]) is None
    assert int_keys_bytes([10**40]) is None
    assert int_keys_bytes([]) is not None


def test_the_hash_table_order_is_that_of_a_stable_sort() -> None:
    # The table is built in the order of a stable sort of the hashes (two radix
    # passes): ties keep the order of the keys, so a file's bytes depend only on
    # its keys and items.
    from mlworkflow_async._store._format2 import _stable_argsort

    rng = np.random.default_rng(1)
    for n, top in ((0, 2**32), (1, 2**32), (1000, 50), (100_000, 2**32)):
        hashes = rng.integers(0, top, n, dtype=np.uint64).astype("<u4")
        assert (_stable_argsort(hashes) == np.argsort(hashes, kind="stable")).all()
