"""W4b: PickledDataset.create from a user's Dataset subclass fetching one item at a time.

The subclass is the common case of a user's own dataset: ``yield_keys`` and
an ``async def query_item`` returning a small dict. It is compared with the
original library's ``create`` of the same items, and with our ``create``
from a :class:`DictDataset` of them (which fetches whole chunks at once):
the engine should make item-by-item fetching cost about the same. Every side
is given the same items, built before timing: the subclass looks its items
up, so that only the way they are fetched differs (building them in
``query_item`` cost 0.37 µs an item, which only our side paid).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

from mlworkflow_async import Dataset, DictDataset, PickledDataset

from ._table import Row, Timer, rate


def _item(key: int) -> dict[str, Any]:
    return {"i": key, "name": f"item-{key}", "score": key / 7}


class _Users(Dataset[int, dict[str, Any]]):
    def __init__(self, items: dict[int, dict[str, Any]]) -> None:
        self.items = items

    def yield_keys(self) -> range:
        return range(len(self.items))

    async def query_item(self, key: int) -> dict[str, Any]:
        return self.items[key]


def _ours(dataset: Dataset[int, Any], path: str, n: int) -> float:
    async def create() -> int:
        return await PickledDataset.create(dataset, path)

    with Timer(cpu=True) as t:
        count = asyncio.run(create())
    assert count == n
    return rate(count, t.seconds)


def _original(items: dict[int, Any], path: str) -> float:
    import mlworkflow

    ds = mlworkflow.DictDataset(items)
    with Timer(cpu=True) as t, open(path, "wb") as f:
        mlworkflow.PickledDataset.create(ds, f)
        # Ours is durable when create returns; make the original's as durable.
        f.flush()
        os.fsync(f.fileno())
    return rate(len(items), t.seconds)


def run(quick: bool) -> list[Row]:
    n = 20_000 if quick else 200_000
    rounds = 2 if quick else 3
    items = {key: _item(key) for key in range(n)}
    subclass, dict_ds, original = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(rounds):  # alternate so drift hits every side alike
            path = os.path.join(folder, f"{i}.pkl")
            subclass.append(_ours(_Users(items), path, n))
            os.remove(path)
            dict_ds.append(_ours(DictDataset(items), path, n))
            os.remove(path)
            original.append(_original(items, path))
            os.remove(path)
    return [
        Row(f"W4b create from a Dataset subclass (query_item), {n:,} small dicts",
            "items/CPU-s", max(subclass), max(original), "mlworkflow 0.6 create (+fsync)", 6.0),
        Row("W4b same, against create from a DictDataset", "items/CPU-s", max(subclass),
            max(dict_ds), "create from DictDataset", None),
    ]
