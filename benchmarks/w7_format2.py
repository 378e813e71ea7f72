"""W7: format 2. Opening at any size, cold lookups, bytes per item, batches read into place.

- Opening a file of 1M tiny items (and 10M in a full run): time and resident
  memory added, against the limits (5 ms, 20 MB) and LMDB and SQLite
  opening the same data.
- ``query_item`` right after opening against the same call once warm.
- Bytes per item of the W3a small items against LMDB and HDF5, and the
  file's own overhead per item (index entry, hash table, alignment,
  checksums; the key's pickle aside) against 32 bytes.
- ``batches(8)`` of 8 MB float32 arrays, summing each batch, against the
  limit: ``os.preadv`` of the same bytes into one preallocated buffer, then
  the same sums; and the worst loop lag meanwhile.
- The cost of checking mapped arrays (``verify="all"``, the default)
  against not checking them (``verify="copied"``).

The big files are written with the encoder directly (the same bytes as
``create``, without the fetching) to keep the run short.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import pickle
import random
import sqlite3
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from mlworkflow_async import DictDataset, PickledDataset
from mlworkflow_async._store._format import ItemPickler
from mlworkflow_async._store._format2 import Encoder2, header2, key_bytes
from mlworkflow_async._store._writes import AtomicFile

from ._data import small_items
from ._table import Row, Timer

_CHUNK = 4096


def _write_tiny(path: str, n: int) -> None:
    sink = AtomicFile(path)
    sink.write([header2()])
    encoder = Encoder2(path)
    for start in range(0, n, _CHUNK):
        keys = list(range(start, min(n, start + _CHUNK)))
        sink.write(encoder.encode(keys, keys))
    encoder.finish(None, sink.write)
    sink.commit()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def _open_ours(path: str) -> tuple[float, float]:
    """Seconds to open, and MB of resident memory added (the dataset kept open)."""
    gc.collect()
    before = _rss_kib()
    with Timer() as t:
        ds = PickledDataset(path)
    added = (_rss_kib() - before) / 1024
    assert len(ds) > 0
    ds.close()
    return t.seconds, added


def _lmdb_file(path: str, n: int) -> None:
    import lmdb

    env = lmdb.open(path, map_size=max(1 << 30, 200 * n), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        for key in range(n):
            txn.put(pickle.dumps(key, 5), pickle.dumps(key, 5))
    env.sync(True)
    env.close()


def _open_lmdb(path: str) -> float:
    import lmdb

    with Timer() as t:
        env = lmdb.open(path, subdir=False, lock=False, readonly=True)
        with env.begin() as txn:
            txn.get(pickle.dumps(1, 5))
    env.close()
    return t.seconds


def _sqlite_file(path: str, n: int) -> None:
    db = sqlite3.connect(path)
    db.execute("create table items (key blob primary key, item blob)")
    db.executemany(
        "insert into items values (?, ?)",
        ((pickle.dumps(k, 5), pickle.dumps(k, 5)) for k in range(n)),
    )
    db.commit()
    db.close()


def _open_sqlite(path: str) -> float:
    with Timer() as t:
        db = sqlite3.connect(path)
        db.execute("select item from items where key = ?", (pickle.dumps(1, 5),)).fetchone()
    db.close()
    return t.seconds


def _lookups(path: str, n: int, rounds: int) -> tuple[float, float]:
    """Median seconds of ``query_item`` just after opening, and warm."""
    rng = random.Random(3)

    async def cold() -> list[float]:
        # Each file opened and queried at once, in one running loop (as the warm
        # calls are): what differs is only that the file was just opened.
        times = []
        for _ in range(20 * rounds):
            ds = PickledDataset(path)
            key = rng.randrange(n)
            with Timer() as t:
                await ds.query_item(key)
            ds.close()
            times.append(t.seconds)
        return times

    async def warm() -> float:
        with PickledDataset(path) as ds:
            keys = [rng.randrange(n) for _ in range(200)]
            for key in keys:
                await ds.query_item(key)
            times = []
            for key in keys:
                with Timer() as t:
                    await ds.query_item(key)
                times.append(t.seconds)
        return statistics.median(times)

    return statistics.median(asyncio.run(cold())), asyncio.run(warm())


def _open_rows(folder: str, quick: bool, rounds: int) -> list[Row]:
    n = 200_000 if quick else 1_000_000
    ours_path = os.path.join(folder, "tiny.pkl")
    _write_tiny(ours_path, n)
    lmdb_path, sqlite_path = os.path.join(folder, "tiny.mdb"), os.path.join(folder, "tiny.db")
    _lmdb_file(lmdb_path, n)
    _sqlite_file(sqlite_path, n)
    opened = [_open_ours(ours_path) for _ in range(5 * rounds)]
    seconds = min(s for s, _ in opened)
    added = statistics.median(a for _, a in opened)
    lmdb_s = min(_open_lmdb(lmdb_path) for _ in range(5 * rounds))
    sqlite_s = min(_open_sqlite(sqlite_path) for _ in range(5 * rounds))
    cold, warm = _lookups(ours_path, n, rounds)
    label = f"{n:,}"
    rows = [
        Row(f"W7 open a {label}-item file", "ms", seconds * 1e3, 5.0, "limit", 1.0,
            higher_is_better=False),
        Row("W7 same, resident memory added", "MB", max(added, 0.01), 20.0, "limit", 1.0,
            higher_is_better=False),
        Row("W7 same, against LMDB opening the same items", "ms", seconds * 1e3, lmdb_s * 1e3,
            "LMDB open + one get", None, higher_is_better=False),
        Row("W7 same, against SQLite", "ms", seconds * 1e3, sqlite_s * 1e3,
            "SQLite connect + one select", None, higher_is_better=False),
        Row(f"W7 query_item just after opening {label} items", "us", cold * 1e6, 2 * warm * 1e6,
            "2x the warm call", 1.0, higher_is_better=False),
    ]
    os.unlink(lmdb_path)
    os.unlink(sqlite_path)
    if not quick:
        big = os.path.join(folder, "tiny10m.pkl")
        _write_tiny(big, 10_000_000)
        big_seconds = min(_open_ours(big)[0] for _ in range(5 * rounds))
        rows.append(Row("W7 open a 10,000,000-item file", "ms", big_seconds * 1e3, seconds * 1e3,
                        f"the {label}-item file", 0.5, higher_is_better=False))
        os.unlink(big)
    return rows


def _sizes(folder: str) -> list[Row]:
    import h5py
    import lmdb

    items = small_items(20_000)
    n = len(items)
    ours = os.path.join(folder, "w3a.pkl")
    asyncio.run(PickledDataset.create(DictDataset(items), ours))
    ours_bytes = os.path.getsize(ours)
    payload = 0  # each item's pickle and array bytes, as written, and its key's pickle
    for key, item in items.items():
        out = io.BytesIO()
        buffers: list[pickle.PickleBuffer] = []
        ItemPickler(out, 5, buffer_callback=buffers.append).dump(item)
        payload += len(key_bytes(key)) + len(out.getvalue()) + sum(b.raw().nbytes for b in buffers)
    path = os.path.join(folder, "w3a.mdb")
    env = lmdb.open(path, map_size=1 << 30, subdir=False, lock=False)
    with env.begin(write=True) as txn:
        for key, item in items.items():
            txn.put(pickle.dumps(key, 5), pickle.dumps(item, 5))
    info, stat = env.info(), env.stat()
    lmdb_bytes = (info["last_pgno"] + 1) * stat["psize"]
    env.close()
    h5 = os.path.join(folder, "w3a.h5")
    with h5py.File(h5, "w") as f:
        f.create_dataset("x", data=np.stack([item["x"] for item in items.values()]))
        f.create_dataset("i", data=np.array([item["i"] for item in items.values()]))
    h5_bytes = os.path.getsize(h5)
    return [
        Row("W7 bytes per W3a item", "B", ours_bytes / n, lmdb_bytes / n, "LMDB", 1.0,
            higher_is_better=False),
        Row("W7 same, against HDF5 (two columns)", "B", ours_bytes / n, h5_bytes / n,
            "HDF5", None, higher_is_better=False),
        Row("W7 file overhead per W3a item (key pickle aside)", "B",
            (ours_bytes - payload) / n, 32.0, "limit", 1.0, higher_is_better=False),
    ]


class _Lag:
    """The worst delay of a task that asks to run every millisecond."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - before - 0.001)


def _limit_batches(path: str, keys: list[int]) -> float:
    """GB/s of os.preadv of each array's bytes into one preallocated batch, then the sums."""
    with PickledDataset(path) as ds:
        places = [ds._reader.index.locate(k) for k in keys]
    size = places[0][3][0][1] - places[0][3][0][0]
    batch = np.empty((8, size // 4), np.float32)
    rows = [memoryview(batch[i]).cast("B") for i in range(8)]
    fd = os.open(path, os.O_RDONLY)
    try:
        with Timer() as t:
            for start in range(0, len(keys), 8):
                for row, (offset, _, _, buffers, _) in zip(
                    rows, places[start:start + 8], strict=False
                ):
                    a = buffers[0][0]
                    os.preadv(fd, [row], offset + a)
                for row_array in batch:
                    float(row_array.sum())
    finally:
        os.close(fd)
    return len(keys) * size / t.seconds / 1e9


async def _sum_rows(batch: Any) -> None:
    """The same sums as the limit's, one array at a time, letting other tasks run between."""
    for row in batch:
        float(row.sum())
        await asyncio.sleep(0)


async def _our_batches(path: str, keys: list[int]) -> tuple[float, float]:
    """GB/s of ``batches(8)`` (each array read into place) with the same sums; the worst lag."""
    lag = _Lag()
    ticker = asyncio.create_task(lag.run())
    total = 0
    async with await PickledDataset.open(path) as ds:
        await asyncio.sleep(0.01)
        lag.worst = 0.0
        with Timer() as t:
            async for _, batch in ds.batches(8, keys=keys):
                total += batch.nbytes
                await _sum_rows(batch)
    ticker.cancel()
    return total / t.seconds / 1e9, lag.worst


def _batch_rows(folder: str, quick: bool, rounds: int) -> list[Row]:
    n = 40 if quick else 64  # a few batches past the first, which starts the threads
    path = os.path.join(folder, "arrays.pkl")
    arrays = {i: np.full(2 << 20, i, np.float32) for i in range(n)}  # 8 MB each
    asyncio.run(PickledDataset.create(DictDataset(arrays), path))
    del arrays
    keys = list(range(n))
    random.Random(2).shuffle(keys)
    _limit_batches(path, keys)  # into the page cache
    asyncio.run(_our_batches(path, keys))  # and the same warm-up for ours (threads, memory)
    limit, engine, engine_lag = [], [], []
    for _ in range(rounds):
        limit.append(_limit_batches(path, keys))
        rate, worst = asyncio.run(_our_batches(path, keys))
        engine.append(rate)
        engine_lag.append(worst)
    mapped_all, mapped_copied = [], []
    for _ in range(rounds):
        for verify, out in (("all", mapped_all), ("copied", mapped_copied)):
            with PickledDataset(path, mmap=True, verify=verify) as ds, Timer() as t:
                for key in keys:
                    ds.sync.query_item(key)
            out.append(t.seconds)
    return [
        Row("W7 batches(8) of 8 MB float32 arrays (read into place), sum each", "GB/s",
            max(engine), max(limit), "os.preadv into one buffer + sums", 0.9),
        Row("W7 same, worst loop lag during batches(8)", "ms", min(engine_lag) * 1e3, 20.0,
            "limit", 1.0, higher_is_better=False),
        Row("W7 mmap=True, first read of every array, checked", "s", min(mapped_all),
            min(mapped_copied), 'verify="copied" (mapped arrays unchecked)', None,
            higher_is_better=False),
    ]


def run(quick: bool) -> list[Row]:
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory() as folder:
        rows = _open_rows(folder, quick, rounds)
        rows += _sizes(folder)
        rows += _batch_rows(folder, quick, rounds)
    return rows
