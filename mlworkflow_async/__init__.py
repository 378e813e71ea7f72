"""Async-first datasets, batching and side runners for machine-learning data pipelines.

>>> import asyncio
>>> from mlworkflow_async import DictDataset, TransformedDataset
>>> ds = TransformedDataset(DictDataset({1: "a", 2: "b"}), [lambda k, v: v.upper()])
>>> asyncio.run(ds.query_item(2))
'B'
"""

from .adapters import from_sync
from .collate import batchify, chunkify
from .dataset import Dataset
from .dict_dataset import DictDataset
from .exceptions import KeysNotReadyError, SyncInLoopError
from .subset import Subset

__all__ = [
    "Dataset",
    "DictDataset",
    "KeysNotReadyError",
    "Subset",
    "SyncInLoopError",
    "batchify",
    "chunkify",
    "from_sync",
]
