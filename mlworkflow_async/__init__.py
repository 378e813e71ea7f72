"""Async-first datasets, batching and side runners for machine-learning data pipelines.

>>> import asyncio
>>> from mlworkflow_async import DictDataset
>>> ds = DictDataset({1: "a", 2: "b"})
>>> asyncio.run(ds.keys.all()), ds.sync.query_item(2)
((1, 2), 'b')
"""

from .adapters import from_sync
from .augmented import AugmentedDataset
from .cached import CachedDataset
from .collate import batchify, chunkify
from .dataset import Dataset
from .dict_dataset import DictDataset
from .exceptions import (
    CorruptFileError,
    KeysNotReadyError,
    PickledFileError,
    RunnerClosedError,
    SyncInLoopError,
    UnpicklableItemError,
    UnsafePickleError,
    UnsupportedVersionError,
)
from .filtered import FilteredDataset
from .pickled import PickledDataset
from .side_runner import SideRunner
from .subset import Subset
from .transformed import TransformedDataset

__all__ = [
    "AugmentedDataset",
    "CachedDataset",
    "CorruptFileError",
    "Dataset",
    "DictDataset",
    "FilteredDataset",
    "KeysNotReadyError",
    "PickledDataset",
    "PickledFileError",
    "RunnerClosedError",
    "SideRunner",
    "Subset",
    "SyncInLoopError",
    "TransformedDataset",
    "UnpicklableItemError",
    "UnsafePickleError",
    "UnsupportedVersionError",
    "batchify",
    "chunkify",
    "from_sync",
]
