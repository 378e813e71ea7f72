"""W4: PickledDataset.create over the W3a items, against the original's create."""

from __future__ import annotations

import asyncio
import os
import tempfile

from mlworkflow_async import DictDataset, PickledDataset

from ._data import small_items
from ._table import Row, Timer, rate


def _ours(items: dict[int, object], path: str) -> float:
    async def create() -> int:
        return await PickledDataset.create(DictDataset(items), path)

    with Timer() as t:
        count = asyncio.run(create())
    assert count == len(items)
    return rate(count, t.seconds)


def _original(items: dict[int, object], path: str) -> float:
    import mlworkflow

    ds = mlworkflow.DictDataset(items)
    with Timer() as t, open(path, "wb") as f:
        mlworkflow.PickledDataset.create(ds, f)
        # Ours is durable when create returns; make the original's as durable.
        f.flush()
        os.fsync(f.fileno())
    return rate(len(items), t.seconds)


def run(quick: bool) -> list[Row]:
    rounds = 2 if quick else 3
    items = small_items(20_000)
    ours, original = [], []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(rounds):
            ours.append(_ours(items, os.path.join(folder, f"ours{i}.pkl")))
            original.append(_original(items, os.path.join(folder, f"orig{i}.pkl")))
    return [
        Row("W4 PickledDataset.create, 20,000 W3a items", "items/s", max(ours), max(original),
            "mlworkflow 0.6 create (+fsync)", 6.0),
    ]
