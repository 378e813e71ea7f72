"""W3: PickledDataset random reads. W3a: small items in batches; W3b: 4 MB arrays.

Our files are format 2: every item is checked against its checksum as it is read.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import tempfile
from typing import Any

import numpy as np

from mlworkflow_async import PickledDataset

from ._data import Key, large_items, named_items, small_items, write_both
from ._table import Row, Timer, rate


async def _ours_batches(path: str, order: list[Any], collate: Any = None) -> float:
    count = 0
    async with await PickledDataset.open(path) as ds:
        with Timer(cpu=True) as t:
            async for keys, _ in ds.batches(64, keys=order, collate_fn=collate):
                count += len(keys)
    assert count == len(order)
    return rate(count, t.seconds)


def _original_batches(path: str, order: list[Any]) -> float:
    import mlworkflow

    ds = mlworkflow.PickledDataset(path)
    count = 0
    with Timer(cpu=True) as t:
        for keys, _ in ds.batches(64, keys=order):
            count += len(keys)
    assert count == len(order)
    return rate(count, t.seconds)


def _raw_loop(path: str, order: list[int]) -> float:
    """The practical limit: a synchronous loop of os.pread, the item's checksum and
    pickle.loads on our file, with every item's place looked up before timing."""
    with PickledDataset(path) as ds:
        index = ds._reader.index
        places = {key: index.locate(key) for key in order}
        csum = ds._reader.csum
    fd = os.open(path, os.O_RDONLY)
    try:
        with Timer(cpu=True) as t:
            for key in order:
                offset, span, plen, buffers, crc = places[key]
                data = memoryview(os.pread(fd, span, offset))
                if csum(data) != crc:
                    raise ValueError(key)
                if buffers is None:
                    pickle.loads(data)
                else:
                    pickle.loads(data[:plen], buffers=[data[a:b] for a, b in buffers])
    finally:
        os.close(fd)
    return rate(len(order), t.seconds)


def _w3a(folder: str, n: int, rounds: int) -> list[Row]:
    ours_path, original_path = write_both(small_items(n), folder, "w3a")
    order = list(range(n))
    random.Random(1).shuffle(order)
    ours, collate_list, original, raw = [], [], [], []
    for _ in range(rounds):
        ours.append(asyncio.run(_ours_batches(ours_path, order)))
        collate_list.append(asyncio.run(_ours_batches(ours_path, order, list)))
        original.append(_original_batches(original_path, order))
        raw.append(_raw_loop(ours_path, order))
    named_path, named_original = write_both(named_items(n), folder, "w3a_named")
    named_order = [Key("image", i) for i in order]
    named, named_theirs = [], []
    for _ in range(rounds):
        named.append(asyncio.run(_ours_batches(named_path, named_order)))
        named_theirs.append(_original_batches(named_original, named_order))
    return [
        Row(f"W3a {n:,} small items, batches(64), shuffled", "items/CPU-s", max(ours),
            max(original), "mlworkflow 0.6 PickledDataset", 6.0),
        Row("W3a same, against the raw loop", "items/CPU-s", max(ours), max(raw),
            "raw os.pread + CRC-32C + pickle.loads", 0.9),
        Row("W3a same with collate_fn=list (no collation)", "items/CPU-s", max(collate_list),
            max(raw), "raw os.pread + CRC-32C + pickle.loads", 0.9),
        Row("W3a the same items keyed by a NamedTuple", "items/CPU-s", max(named),
            max(named_theirs), "mlworkflow 0.6 PickledDataset", None),
    ]


async def _ours_large(path: str, mmap: bool, touch: bool) -> tuple[float, float]:
    async with await PickledDataset.open(path, mmap=mmap) as ds:
        keys = await ds.keys.all()
        total = 0
        with Timer() as t:
            for start in range(0, len(keys), 8):
                for array in await ds.query_items(keys[start : start + 8]):
                    total += array.nbytes
                    if touch:
                        float(array.sum())
    return total / t.seconds / 1e9, t.seconds


def _original_large(path: str, touch: bool) -> float:
    import mlworkflow

    ds = mlworkflow.PickledDataset(path)
    total = 0
    with Timer() as t:
        for key in ds.keys:
            array = ds.query_item(key)
            total += array.nbytes
            if touch:
                float(array.sum())
    return total / t.seconds / 1e9


def _np_load(folder: str, items: dict[int, np.ndarray]) -> float:
    path = os.path.join(folder, "w3b.npy")
    np.save(path, np.stack(list(items.values())))
    with Timer() as t:
        np.load(path)
    return t.seconds


def _w3b(folder: str, n: int, rounds: int) -> list[Row]:
    items = large_items(n)
    ours_path, original_path = write_both(items, folder, "w3b")
    load_seconds = min(_np_load(folder, items) for _ in range(rounds))
    del items
    get, get_touch, orig, orig_touch, mapped = [], [], [], [], []
    for _ in range(rounds):
        get.append(asyncio.run(_ours_large(ours_path, False, False))[0])
        get_touch.append(asyncio.run(_ours_large(ours_path, False, True))[0])
        orig.append(_original_large(original_path, False))
        orig_touch.append(_original_large(original_path, True))
        mapped.append(asyncio.run(_ours_large(ours_path, True, False))[1])
    return [
        Row(f"W3b {n} arrays of 4 MB, get them", "GB/s", max(get), max(orig),
            "mlworkflow 0.6 PickledDataset", 4.0),
        # Large arrays are mapped, not copied: their pages are read when touched.
        # Summing (about 8 GB/s here) costs both sides the same and dominates.
        Row("W3b same, get and sum every array", "GB/s", max(get_touch), max(orig_touch),
            "mlworkflow 0.6, same sums", None),
        Row("W3b mmap=True, time to get all arrays", "s", min(mapped), load_seconds,
            "np.load of the same data", None, higher_is_better=False),
    ]


def run(quick: bool) -> list[Row]:
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory() as folder:
        rows = _w3a(folder, 20_000, rounds)
        rows += _w3b(folder, 16 if quick else 64, rounds)
    return rows
