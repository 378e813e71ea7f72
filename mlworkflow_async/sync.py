"""Blocking facades for plain scripts.

``dataset.sync`` is a :class:`SyncView`; ``SideRunner`` here is the blocking
twin of :class:`mlworkflow_async.SideRunner`, and ``PickledDataset`` the twin
of :class:`mlworkflow_async.PickledDataset` whose ``create`` blocks. All run the one async
implementation on a shared background event-loop thread; they never
reimplement it. Calling them from inside a running event loop raises
:class:`~mlworkflow_async.exceptions.SyncInLoopError` instead of freezing it.

>>> from mlworkflow_async import DictDataset
>>> ds = DictDataset({i: i * i for i in range(5)})
>>> [batch.tolist() for _, batch in ds.sync.batches(2)]
[[0, 1], [4, 9], [16]]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from ._core._portal import ensure_blocking_allowed, get_portal
from ._runner._blocking import SideRunner
from ._store import _pickled

if TYPE_CHECKING:
    from ._core._dataset import Dataset
    from ._core._engine import BatchStream
    from ._core._keys import KeySequence

__all__ = ["SyncView", "SyncKeys", "SyncBatches", "SideRunner", "PickledDataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_KEYS_PER_TRIP = 1024


class SyncKeys(Generic[K]):
    """Blocking access to a dataset's memoized keys."""

    def __init__(self, keys: KeySequence[K]) -> None:
        self._keys = keys

    def __iter__(self) -> Iterator[K]:
        ensure_blocking_allowed("iterating dataset.sync.keys", "`async for key in dataset.keys`")
        portal = get_portal()
        start = 0
        while True:
            chunk = portal.call(self._keys.chunk_from, start, _KEYS_PER_TRIP)
            if not chunk:
                return
            yield from chunk
            start += len(chunk)

    def all(self) -> tuple[K, ...]:
        """Compute every key and return them as a tuple."""
        ensure_blocking_allowed("dataset.sync.keys.all()", "`await dataset.keys.all()`")
        return get_portal().call(self._keys.all)

    def __repr__(self) -> str:
        return repr(self._keys)


class SyncBatches(Generic[K]):
    """Blocking iterator over a :class:`BatchStream`; prefetching goes on in the background."""

    def __init__(self, stream: BatchStream[K]) -> None:
        self._stream = stream
        self._done = False

    def __iter__(self) -> SyncBatches[K]:
        return self

    def __next__(self) -> tuple[list[K], Any]:
        if self._done:
            raise StopIteration
        ensure_blocking_allowed(
            "iterating dataset.sync.batches()", "`async for ... in dataset.batches()`"
        )
        try:
            batch: tuple[list[K], Any] = get_portal().call(self._stream.__anext__)
            return batch
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        """Stop the stream and cancel fetches in flight."""
        if not self._done:
            self._done = True
            get_portal().call(self._stream.aclose)

    def __enter__(self) -> SyncBatches[K]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done:
            # The portal may already be gone at interpreter exit.
            with contextlib.suppress(Exception):
                get_portal().start_task_soon(self._stream.aclose)


class SyncView(Generic[K, V]):
    """The blocking face of a dataset: same calls, no ``await``.

    >>> from mlworkflow_async import DictDataset
    >>> view = DictDataset({"x": 1}).sync
    >>> list(view.keys), len(view), view.query(["x"]).tolist()
    (['x'], 1, [1])
    """

    def __init__(self, dataset: Dataset[K, V]) -> None:
        self.dataset = dataset

    @property
    def keys(self) -> SyncKeys[K]:
        return SyncKeys(self.dataset.keys)

    def __len__(self) -> int:
        return len(self.dataset)

    def query_item(self, key: K) -> V:
        ensure_blocking_allowed("dataset.sync.query_item()", "`await dataset.query_item(key)`")
        return get_portal().call(self.dataset.query_item, key)

    def query_items(self, keys: Sequence[K]) -> list[V]:
        ensure_blocking_allowed("dataset.sync.query_items()", "`await dataset.query_items(keys)`")
        return get_portal().call(self.dataset.query_items, keys)

    def query(
        self,
        keys: Sequence[K],
        collate_fn: Callable[[list[V]], Any] | None = None,
        wrapper: Any = np.array,
    ) -> Any:
        ensure_blocking_allowed("dataset.sync.query()", "`await dataset.query(keys)`")
        return get_portal().call(self.dataset.query, keys, collate_fn, wrapper)

    def batches(
        self,
        batch_size: int,
        keys: Iterable[K] | None = None,
        collate_fn: Callable[[list[V]], Any] | None = None,
        wrapper: Any = np.array,
        drop_incomplete: bool = False,
        concurrency: int | None = None,
    ) -> SyncBatches[K]:
        """Blocking :meth:`Dataset.batches`; the next batches load meanwhile."""
        ensure_blocking_allowed("dataset.sync.batches()", "`async for ... in dataset.batches()`")
        stream = self.dataset.batches(
            batch_size, keys, collate_fn, wrapper, drop_incomplete, concurrency
        )
        return SyncBatches(stream)

    def __repr__(self) -> str:
        return f"<blocking view of {self.dataset!r}>"


class PickledDataset(_pickled.PickledDataset):
    """:class:`mlworkflow_async.PickledDataset` with a blocking :meth:`create`.

    The seed's script API, as it was: ``PickledDataset.create(dataset, path)``
    then ``PickledDataset(path)``. Reading is the same class; use ``ds.sync``
    for blocking reads.

    >>> import os, tempfile
    >>> from mlworkflow_async import DictDataset
    >>> path = os.path.join(tempfile.mkdtemp(), "letters.pkl")
    >>> PickledDataset.create(DictDataset({1: "a", 2: "b"}), path)
    2
    >>> with PickledDataset(path) as ds:
    ...     print(ds.sync.query_item(2), len(ds))
    b 2
    """

    @classmethod
    def create(  # type: ignore[override]
        cls,
        dataset: Any,
        path: Any,
        keys: Iterable[Any] | None = None,
        *,
        concurrency: int = 256,
        progress: bool = False,
        shards: int | None = None,
        client: Any = None,
    ) -> int:
        """Blocking :meth:`mlworkflow_async.PickledDataset.create`; returns the item count."""
        ensure_blocking_allowed(
            "mlworkflow_async.sync.PickledDataset.create()",
            "`await mlworkflow_async.PickledDataset.create(...)`",
        )
        create = _pickled.PickledDataset.create

        async def run() -> int:
            return await create(
                dataset, path, keys, concurrency=concurrency, progress=progress,
                shards=shards, client=client,
            )

        count: int = get_portal().call(run)
        return count
