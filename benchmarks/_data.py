"""Shared benchmark data: the W3a small items, the W3b large arrays, their files."""

from __future__ import annotations

import asyncio
import os
from typing import Any, NamedTuple

import numpy as np

from mlworkflow_async import DictDataset, PickledDataset


def small_items(n: int) -> dict[int, dict[str, Any]]:
    """W3a items: a dict holding a 100-float32 array and an int."""
    rng = np.random.default_rng(0)
    return {i: {"x": rng.random(100, dtype=np.float32), "i": i} for i in range(n)}


class Key(NamedTuple):
    """A key as datasets often have them: a name and an index."""

    name: str
    index: int


def named_items(n: int) -> dict[Key, dict[str, Any]]:
    """The W3a items keyed by a NamedTuple."""
    return {Key("image", i): item for i, item in small_items(n).items()}


def large_items(n: int, megabytes: int = 4) -> dict[int, np.ndarray]:
    """W3b items: ``n`` float32 arrays of ``megabytes`` MB each."""
    size = megabytes * 1024 * 1024 // 4
    return {i: np.full(size, i, np.float32) for i in range(n)}


def write_both(items: dict[Any, Any], folder: str, name: str) -> tuple[str, str]:
    """The same items as a file of ours and as a file of the original library."""
    import mlworkflow

    ours = os.path.join(folder, f"{name}.pkl")
    original = os.path.join(folder, f"{name}.legacy.pkl")
    asyncio.run(PickledDataset.create(DictDataset(items), ours))
    mlworkflow.PickledDataset.create(mlworkflow.DictDataset(items), original)
    return ours, original
