"""W1b: filter by key -> transform -> batches(64), against PyTorch's DataLoader.

Both sides produce the same batches: a dict of one array (a tensor, for
PyTorch) per field. Ours streams the keys as the filter accepts them; the
DataLoader needs a map-style dataset, so its timing includes computing the
kept keys first. A second row reads the same chain as a plain script
does, through the blocking view (``ds.sync.batches``); a third measures
what streaming the keys costs against awaiting them all before the first
batch.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from mlworkflow_async import DictDataset, FilteredDataset, TransformedDataset

from ._table import Row, Timer, rate

BATCH = 64


def _items(n: int) -> dict[int, dict[str, Any]]:
    return {i: {"x": i, "v": np.float32(i)} for i in range(n)}


def _keep(key: int) -> bool:
    return key % 4 != 0


def _scale(key: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"x": item["x"] * 2, "v": item["v"]}


def _ours(items: dict[int, dict[str, Any]], known: bool) -> tuple[float, int]:
    async def consume() -> tuple[float, int]:
        ds = TransformedDataset(FilteredDataset(DictDataset(items), _keep), [_scale])
        count = total = 0
        with Timer(cpu=True) as t:
            if known:
                await ds.keys.all()
            async for keys, batch in ds.batches(BATCH):
                count += len(keys)
                total += int(batch["x"][-1])
        return rate(count, t.seconds), total

    return asyncio.run(consume())


def _ours_blocking(items: dict[int, dict[str, Any]]) -> tuple[float, int]:
    """The same chain read by a plain script, through the blocking view."""
    ds = TransformedDataset(FilteredDataset(DictDataset(items), _keep), [_scale])
    count = total = 0
    with Timer(cpu=True) as t:
        for keys, batch in ds.sync.batches(BATCH):
            count += len(keys)
            total += int(batch["x"][-1])
    return rate(count, t.seconds), total


def _torch(items: dict[int, dict[str, Any]]) -> tuple[float, int]:
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    class Kept(TorchDataset[dict[str, Any]]):
        def __init__(self, keys: list[int]) -> None:
            self.keys = keys

        def __len__(self) -> int:
            return len(self.keys)

        def __getitem__(self, index: int) -> dict[str, Any]:
            key = self.keys[index]
            return _scale(key, items[key])

    count = total = 0
    with Timer(cpu=True) as t:
        kept = [key for key in items if _keep(key)]
        for batch in DataLoader(Kept(kept), batch_size=BATCH, num_workers=0):
            count += len(batch["x"])
            total += int(batch["x"][-1])
    return rate(count, t.seconds), total


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(quick: bool) -> list[Row]:
    n = 20_000 if quick else 100_000
    rounds = 2 if quick else 3
    items = _items(n)
    has_torch = _torch_available()
    if has_torch:
        import torch

        # One thread, as a data-loading process would use: the figure is CPU time.
        torch.set_num_threads(1)
    streamed, known, blocking, peer = [], [], [], []
    for _ in range(rounds):  # alternate so drift hits every side alike
        rate_streamed, total = _ours(items, known=False)
        rate_known, total_known = _ours(items, known=True)
        assert total == total_known
        rate_blocking, total_blocking = _ours_blocking(items)
        assert total == total_blocking
        streamed.append(rate_streamed)
        known.append(rate_known)
        blocking.append(rate_blocking)
        if has_torch:
            rate_torch, total_torch = _torch(items)
            assert total == total_torch, "both pipelines must compute the same batches"
            peer.append(rate_torch)
    title = f"W1b filter -> transform -> batches(64), {n:,} items, keys streamed"
    if has_torch:
        import torch

        peer_name = f"torch {torch.__version__.split('+')[0]} DataLoader(num_workers=0)"
        torch_rows = [
            Row(title, "items/CPU-s", max(streamed), max(peer), peer_name, 1.0),
            Row("W1b same through ds.sync.batches(64), a plain script", "items/CPU-s",
                max(blocking), max(peer), peer_name, None),
        ]
    else:
        torch_rows = [Row(title, "items/CPU-s", max(streamed), float("nan"),
                          "torch DataLoader", None,
                          note="skipped: torch not installed (pip install -e '.[bench]')")]
    return [
        *torch_rows,
        Row("W1b same, keys streamed vs awaited first", "items/CPU-s", max(streamed),
            max(known), "await ds.keys.all() then batches(64)", 0.9),
    ]
