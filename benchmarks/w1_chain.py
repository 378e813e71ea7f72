"""W1: a combinator chain, filter by key -> transform -> augment to 2 children."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from mlworkflow_async import AugmentedDataset, DictDataset, FilteredDataset, TransformedDataset

from ._table import Row, Timer, rate


def _items(n: int) -> dict[int, dict[str, Any]]:
    return {i: {"x": i, "v": np.float32(i)} for i in range(n)}


def _keep(key: int) -> bool:
    return key % 4 != 0


def _scale(key: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"x": item["x"] * 2, "v": item["v"]}


class _Twice(AugmentedDataset[Any, Any]):
    def augment(self, root_key: Any, root_item: Any) -> Any:
        yield (root_key, 0), root_item
        yield (root_key, 1), {"x": -root_item["x"], "v": root_item["v"]}


def _ours(n: int) -> tuple[float, int]:
    async def consume() -> tuple[float, int]:
        ds = _Twice(TransformedDataset(FilteredDataset(DictDataset(_items(n)), _keep), [_scale]))
        total = 0
        with Timer(cpu=True) as t:
            async for key in ds.keys:
                total += (await ds.query_item(key))["x"]
        return rate(len(ds), t.seconds), total

    return asyncio.run(consume())


def _ours_batches(n: int) -> float:
    async def consume() -> float:
        ds = _Twice(TransformedDataset(FilteredDataset(DictDataset(_items(n)), _keep), [_scale]))
        count = 0
        with Timer(cpu=True) as t:
            async for keys, _ in ds.batches(64, collate_fn=list):
                count += len(keys)
        return rate(count, t.seconds)

    return asyncio.run(consume())


def _original(n: int) -> tuple[float, int]:
    import mlworkflow

    class Twice(mlworkflow.AugmentedDataset):  # type: ignore[misc]
        def augment(self, root_key: Any, root_item: Any) -> Any:
            yield (root_key, 0), root_item
            yield (root_key, 1), {"x": -root_item["x"], "v": root_item["v"]}

    ds = Twice(
        mlworkflow.TransformedDataset(
            mlworkflow.FilteredDataset(mlworkflow.DictDataset(_items(n)), _keep), [_scale]
        )
    )
    total = count = 0
    with Timer(cpu=True) as t:
        for key in ds.keys:
            total += ds.query_item(key)["x"]
            count += 1
    return rate(count, t.seconds), total


def run(quick: bool) -> list[Row]:
    n = 20_000 if quick else 100_000
    rounds = 2 if quick else 3
    ours, original = [], []
    for _ in range(rounds):
        rate_ours, total_ours = _ours(n)
        rate_orig, total_orig = _original(n)
        assert total_ours == total_orig, "both chains must compute the same items"
        ours.append(rate_ours)
        original.append(rate_orig)
    batched = max(_ours_batches(n) for _ in range(rounds))
    return [
        Row(f"W1 chain of {n:,} items, keys then query_item", "items/CPU-s", max(ours),
            max(original), "mlworkflow 0.6 chain", 2.0),
        Row("W1 same chain through batches(64)", "items/CPU-s", batched, max(original),
            "mlworkflow 0.6 chain", 2.0),
    ]
