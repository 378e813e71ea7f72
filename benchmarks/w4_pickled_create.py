"""W4: PickledDataset.create against the original's create and LMDB, on the W3a items and on
1M tiny items (an int each)."""

from __future__ import annotations

import asyncio
import os
import pickle
import tempfile
from typing import Any

from mlworkflow_async import DictDataset, PickledDataset

from ._data import small_items
from ._table import Row, Timer, rate


def _ours(items: dict[Any, Any], path: str) -> float:
    async def create() -> int:
        return await PickledDataset.create(DictDataset(items), path)

    with Timer() as t:
        count = asyncio.run(create())
    assert count == len(items)
    return rate(count, t.seconds)


def _original(items: dict[Any, Any], path: str) -> float:
    import mlworkflow

    ds = mlworkflow.DictDataset(items)
    with Timer() as t, open(path, "wb") as f:
        mlworkflow.PickledDataset.create(ds, f)
        # Ours is durable when create returns; make the original's as durable.
        f.flush()
        os.fsync(f.fileno())
    return rate(len(items), t.seconds)


def lmdb_write(items: dict[Any, Any], path: str) -> None:
    """The same items in LMDB: pickled keys to pickled items, one transaction, synced."""
    import lmdb

    size = 64 << 20
    size += 2 * sum(len(pickle.dumps(v, 5)) + 64 for v in list(items.values())[:1000]) * max(
        1, len(items) // 1000
    )
    env = lmdb.open(path, map_size=size, subdir=False, lock=False, sync=True)
    try:
        with env.begin(write=True) as txn:
            put = txn.put
            dumps = pickle.dumps
            for key, item in items.items():
                put(dumps(key, 5), dumps(item, 5))
        env.sync(True)
    finally:
        env.close()


def _lmdb(items: dict[Any, Any], path: str) -> float:
    with Timer() as t:
        lmdb_write(items, path)
    return rate(len(items), t.seconds)


def _rows(label: str, items: dict[Any, Any], folder: str, rounds: int) -> list[Row]:
    ours, original, lmdb_rates = [], [], []
    for i in range(rounds):
        ours.append(_ours(items, os.path.join(folder, f"ours{i}.pkl")))
        original.append(_original(items, os.path.join(folder, f"orig{i}.pkl")))
        lmdb_rates.append(_lmdb(items, os.path.join(folder, f"lmdb{i}.mdb")))
        for name in (f"ours{i}.pkl", f"orig{i}.pkl", f"lmdb{i}.mdb"):
            os.unlink(os.path.join(folder, name))
    return [
        Row(f"W4 PickledDataset.create, {label}", "items/s", max(ours), max(original),
            "mlworkflow 0.6 create (+fsync)", 6.0),
        Row(f"W4 same, {label}", "items/s", max(ours), max(lmdb_rates),
            "LMDB, one transaction (+sync)", 1.0),
    ]


def run(quick: bool) -> list[Row]:
    rounds = 2 if quick else 3
    with tempfile.TemporaryDirectory() as folder:
        rows = _rows("20,000 W3a items", small_items(20_000), folder, rounds)
        n = 200_000 if quick else 1_000_000
        rows += _rows(f"{n:,} tiny items", {i: i for i in range(n)}, folder, rounds)
    return rows
