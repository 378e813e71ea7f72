"""Blocking facades for plain scripts.

``dataset.sync`` is a :class:`SyncView`; ``SideRunner`` here is the blocking
twin of :class:`mlworkflow_async.SideRunner`, and ``PickledDataset`` the twin
of :class:`mlworkflow_async.PickledDataset` whose ``create`` blocks. All run the one async
implementation on a shared background event-loop thread; they never
reimplement it. Calling them from inside a running event loop raises
:class:`~mlworkflow_async.exceptions.SyncInLoopError` instead of freezing it,
except inside a Jupyter (IPython) kernel, or after
:func:`allow_blocking_in_loop` for other hosts that run a loop around plain code.

>>> from mlworkflow_async import DictDataset
>>> ds = DictDataset({i: i * i for i in range(5)})
>>> [batch.tolist() for _, batch in ds.sync.batches(2)]
[[0, 1], [4, 9], [16]]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from ._core._dataset import bounded_items
from ._core._handoff import Handoff
from ._core._portal import allow_blocking_in_loop, call, ensure_blocking_allowed, get_portal
from ._runner._blocking import SideRunner, SyncPrefetcher
from ._store import _pickled

if TYPE_CHECKING:
    from ._core._dataset import Dataset
    from ._core._engine import Failure, StreamStats
    from ._core._keys import KeySequence
    from ._core._stream import BatchStream

__all__ = [
    "SyncView",
    "SyncKeys",
    "SyncBatches",
    "SideRunner",
    "SyncPrefetcher",
    "PickledDataset",
    "allow_blocking_in_loop",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_KEYS_PER_TRIP = 1024
#: Batches a blocking stream takes ahead of the script, besides the stream's own
#: prefetching: enough that a script rarely waits for a thread to wake up
#: (benchmark W10: 0.12x the awaited stream with 2, 0.35x with 16), bounded by
#: what the arrays of the first batch weigh.
_AHEAD_MOST, _AHEAD_LEAST, _AHEAD_BYTES = 16, 2, 64 << 20


class _Reader:
    """Stands for a blocking reader of keys while it iterates (held weakly)."""

    __slots__ = ("__weakref__",)


class SyncKeys(Generic[K]):
    """Blocking access to a dataset's memoized keys."""

    def __init__(self, keys: KeySequence[K]) -> None:
        self._keys = keys

    def __iter__(self) -> Iterator[K]:
        ensure_blocking_allowed("iterating dataset.sync.keys", "`async for key in dataset.keys`")
        reader = _Reader()
        self._keys.claim(reader, _KEYS_PER_TRIP)
        start = 0
        while True:
            chunk = call(self._keys.chunk_from, start, _KEYS_PER_TRIP)
            if not chunk:
                return
            yield from chunk
            start += len(chunk)

    def all(self) -> list[K]:
        """Compute every key and return them as a new list."""
        ensure_blocking_allowed("dataset.sync.keys.all()", "`await dataset.keys.all()`")
        return call(self._keys.all)

    def __repr__(self) -> str:
        return repr(self._keys)


class SyncBatches(Generic[K]):
    """Blocking iterator over a :class:`~mlworkflow_async.BatchStream`.

    A task on the background loop takes the batches as they are ready, a
    few before the script asks for them, so that asking waits only when none
    is ready (a blocking call a batch would cost two thread wake-ups each,
    about 0.1 ms here: benchmark W10): up to 16 batches of arrays holding at
    most 64 MiB in all, and 2 batches of anything else. It has the stream's
    :meth:`state_dict` (as of the batches it returned), :attr:`failures` and
    :attr:`stats`.
    """

    def __init__(self, stream: BatchStream[K]) -> None:
        self._stream = stream
        self._handoff: Handoff[tuple[list[K], Any]] = Handoff(
            stream, _AHEAD_LEAST, stream._where
        )
        self._sized = False
        self._where: tuple[int, tuple[int, ...]] | None = None
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
            batch, self._where = self._handoff.take()
            if not self._sized:
                self._sized = True
                self._handoff.set_ahead(_ahead_for(batch[1]))
            return batch
        except StopAsyncIteration:
            self.close()
            raise StopIteration from None
        except BaseException:
            self._done = True
            # Interrupted or failed: stop the stream without waiting for it.
            with contextlib.suppress(Exception):
                get_portal().start_task_soon(self._aclose)
            raise

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, as of the batches returned so far; pass it as
        ``batches(..., resume=state)`` to continue."""
        # From the snapshot taken on the loop with the last batch returned: no
        # call to the loop, and nothing read that the loop is changing.
        return self._stream._state_at(self._where)

    @property
    def failures(self) -> list[Failure[K]]:
        """Items left out with ``on_error="skip"`` (including those of the batches
        taken ahead)."""
        return self._stream.failures

    @property
    def stats(self) -> StreamStats:
        """Counts of the stream so far."""
        return self._stream.stats

    def close(self) -> None:
        """Stop the stream and cancel fetches in flight."""
        if not self._done:
            self._done = True
            if not self._handoff.in_forked_child():  # else the work is the parent's
                call(self._aclose)

    async def _aclose(self) -> None:
        await self._handoff.aclose()
        await self._stream.aclose()

    def __enter__(self) -> SyncBatches[K]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True) and not self._handoff.in_forked_child():
            # The portal may already be gone at interpreter exit.
            with contextlib.suppress(Exception):
                get_portal().start_task_soon(self._aclose)


def _ahead_for(batch: Any) -> int:
    """How many batches like ``batch`` to take ahead: up to _AHEAD_BYTES of arrays.

    Batches of anything but arrays (an array, or a dict, tuple or list of
    them, as collation makes) are taken only _AHEAD_LEAST ahead: their size
    is not known.
    """
    parts = batch.values() if isinstance(batch, dict) else (
        batch if isinstance(batch, list | tuple) else (batch,)
    )
    size = 0
    for part in parts:
        nbytes = getattr(part, "nbytes", None)
        if type(nbytes) is not int or getattr(getattr(part, "dtype", None), "hasobject", False):
            return _AHEAD_LEAST  # an object array's nbytes counts only its pointers
        size += nbytes
    return max(_AHEAD_LEAST, min(_AHEAD_MOST, _AHEAD_BYTES // max(size, 1)))


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
        """Blocking :meth:`Dataset.query_item`.

        A local ``PickledDataset`` or a ``DictDataset``, and a ``Subset``, a
        ``FilteredDataset`` of a plain key predicate or a ``TransformedDataset``
        of plain transforms over one (none subclassed to fetch otherwise), is
        read on the calling thread, its functions run there: about 20x quicker
        a call than a round trip to the event loop, and what a map-style
        ``__getitem__`` (PyTorch's ``Dataset``, say) wants. Anything else runs
        on the event loop's thread.
        """
        ensure_blocking_allowed("dataset.sync.query_item()", "`await dataset.query_item(key)`")
        served = self.dataset._blocking_items((key,))
        if served is not None:
            return served[0]
        return call(self.dataset.query_item, key)

    def query_items(self, keys: Sequence[K], concurrency: int | None = None) -> list[V]:
        ensure_blocking_allowed("dataset.sync.query_items()", "`await dataset.query_items(keys)`")
        dataset = self.dataset
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)  # read once, whichever way the items then come
        served = dataset._blocking_items(keys)
        if served is not None:
            return served

        async def run() -> list[V]:
            return list(await bounded_items(dataset, keys, concurrency))

        return call(run)

    def query(
        self,
        keys: Sequence[K],
        collate_fn: Callable[[list[V]], Any] | None = None,
        wrapper: Any = np.array,
        *,
        concurrency: int | None = None,
    ) -> Any:
        ensure_blocking_allowed("dataset.sync.query()", "`await dataset.query(keys)`")
        dataset = self.dataset

        async def run() -> Any:
            return await dataset.query(keys, collate_fn, wrapper, concurrency=concurrency)

        return call(run)

    def batches(
        self,
        batch_size: int,
        keys: Iterable[K] | None = None,
        collate_fn: Callable[[list[V]], Any] | None = None,
        wrapper: Any = np.array,
        drop_incomplete: bool = False,
        concurrency: int | None = None,
        **options: Any,
    ) -> SyncBatches[K]:
        """Blocking :meth:`Dataset.batches` (same arguments); the next batches load meanwhile.

        >>> from mlworkflow_async import DictDataset
        >>> stream = DictDataset({i: i for i in range(6)}).sync.batches(2, shuffle=3)
        >>> first = next(stream)
        >>> state = stream.state_dict()
        >>> stream.close()
        >>> resumed = DictDataset({i: i for i in range(6)}).sync.batches(2, shuffle=3, resume=state)
        >>> sorted(first[0] + [k for keys, _ in resumed for k in keys])
        [0, 1, 2, 3, 4, 5]
        """
        ensure_blocking_allowed("dataset.sync.batches()", "`async for ... in dataset.batches()`")
        stream = self.dataset.batches(
            batch_size, keys, collate_fn, wrapper, drop_incomplete, concurrency, **options
        )
        return SyncBatches(stream)

    def __repr__(self) -> str:
        return f"<blocking view of {self.dataset!r}>"


class PickledDataset(SyncView[Any, Any]):
    """The blocking twin of :class:`mlworkflow_async.PickledDataset`.

    The seed's script API, as it was: ``PickledDataset.create(dataset, path)``
    blocks and returns the item count, then ``PickledDataset(path)`` opens the
    file for blocking reads (``query_item``, ``batches``...). Both run the one
    async implementation; :attr:`dataset` is the async dataset itself.

    >>> import os, tempfile
    >>> from mlworkflow_async import DictDataset
    >>> path = os.path.join(tempfile.mkdtemp(), "letters.pkl")
    >>> PickledDataset.create(DictDataset({1: "a", 2: "b"}), path)
    2
    >>> with PickledDataset(path) as ds:
    ...     print(ds.query_item(2), len(ds))
    b 2
    """

    dataset: _pickled.PickledDataset

    def __init__(self, path: Any, **options: Any) -> None:
        super().__init__(_pickled.PickledDataset(path, **options))

    @classmethod
    def create(
        cls,
        dataset: Any,
        path: Any,
        keys: Iterable[Any] | None = None,
        **options: Any,
    ) -> int:
        """Blocking :meth:`mlworkflow_async.PickledDataset.create`; returns the item count."""
        ensure_blocking_allowed(
            "mlworkflow_async.sync.PickledDataset.create()",
            "`await mlworkflow_async.PickledDataset.create(...)`",
        )
        create = _pickled.PickledDataset.create

        async def run() -> int:
            return await create(dataset, path, keys, **options)

        count: int = call(run)
        return count

    @property
    def path(self) -> str:
        return self.dataset.path

    @property
    def context(self) -> dict[str, Any]:
        return self.dataset.context

    def close(self) -> None:
        """Close the file; arrays already read stay valid."""
        self.dataset.close()

    def __enter__(self) -> PickledDataset:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
