"""Async-first datasets, batching and side runners for machine-learning data pipelines.

>>> import asyncio
>>> from mlworkflow_async import DictDataset
>>> ds = DictDataset({1: "a", 2: "b"})
>>> asyncio.run(ds.keys.all()), ds.sync.query_item(2)
([1, 2], 'b')
"""

from ._combinators._augmented import AugmentedDataset
from ._combinators._cached import CachedDataset
from ._combinators._filtered import FilteredDataset
from ._combinators._retrying import RetryingDataset
from ._combinators._transformed import TransformedDataset
from ._core._adapters import from_sync
from ._core._collate import batchify, chunkify
from ._core._dataset import Dataset
from ._core._dict_dataset import DictDataset
from ._core._engine import Failure, StreamStats
from ._core._keys import KeySequence
from ._core._stream import BatchStream
from ._core._subset import Subset
from ._runner._prefetch import Prefetcher
from ._runner._side_runner import RunHandle, SideRunner
from ._store._pickled import PickledDataset
from .exceptions import (
    CorruptFileError,
    ItemCountError,
    KeyClassNotFoundError,
    KeysNotReadyError,
    MlworkflowAsyncError,
    PickledFileError,
    ResumeError,
    RunnerClosedError,
    SyncInLoopError,
    TooManyFailuresError,
    UnhashableKeyError,
    UnpicklableItemError,
    UnpicklableSourceError,
    UnsafePickleError,
    UnsupportedBackendError,
    UnsupportedVersionError,
    WorkerDiedError,
    WorkerLostError,
)

__all__ = [
    "AugmentedDataset",
    "BatchStream",
    "CachedDataset",
    "CorruptFileError",
    "Dataset",
    "DictDataset",
    "Failure",
    "FilteredDataset",
    "ItemCountError",
    "KeyClassNotFoundError",
    "KeySequence",
    "KeysNotReadyError",
    "MlworkflowAsyncError",
    "PickledDataset",
    "PickledFileError",
    "Prefetcher",
    "ResumeError",
    "RetryingDataset",
    "RunHandle",
    "RunnerClosedError",
    "SideRunner",
    "StreamStats",
    "Subset",
    "SyncInLoopError",
    "TooManyFailuresError",
    "TransformedDataset",
    "UnhashableKeyError",
    "UnpicklableItemError",
    "UnpicklableSourceError",
    "UnsafePickleError",
    "UnsupportedBackendError",
    "UnsupportedVersionError",
    "WorkerDiedError",
    "WorkerLostError",
    "batchify",
    "chunkify",
    "from_sync",
]

