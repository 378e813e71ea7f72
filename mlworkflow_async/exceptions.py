"""Every exception class the library raises on purpose, in one flat module.

Each derives from :class:`MlworkflowAsyncError` and from the builtin it
resembles, so ``except OSError`` or ``except RuntimeError`` keep working::

    MlworkflowAsyncError
    ├── KeysNotReadyError (RuntimeError)
    ├── SyncInLoopError (RuntimeError)
    ├── RunnerClosedError (RuntimeError)
    ├── UnsupportedBackendError (RuntimeError)
    ├── ItemCountError (RuntimeError)
    ├── TooManyFailuresError (RuntimeError)
    ├── WorkerDiedError (RuntimeError)
    │   └── WorkerLostError
    ├── ResumeError (ValueError)
    ├── UnhashableKeyError (TypeError)
    ├── UnpicklableItemError (TypeError)
    ├── UnpicklableSourceError (TypeError)
    └── PickledFileError (OSError)
        ├── CorruptFileError
        ├── UnsupportedVersionError
        ├── UnsafePickleError
        ├── KeyClassNotFoundError
        └── RemoteFileError (a file behind a URL)
            ├── RemoteFileNotFoundError (also FileNotFoundError)
            └── RemoteFileChangedError

Errors raised by user code (a dataset's ``query_item``, a transform, a
predicate) are never wrapped: they propagate with their own type, and a note
naming the key that was being processed is added to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CorruptFileError",
    "ItemCountError",
    "KeyClassNotFoundError",
    "KeysNotReadyError",
    "MlworkflowAsyncError",
    "PickledFileError",
    "RemoteFileChangedError",
    "RemoteFileError",
    "RemoteFileNotFoundError",
    "ResumeError",
    "RunnerClosedError",
    "SyncInLoopError",
    "TooManyFailuresError",
    "UnhashableKeyError",
    "UnpicklableItemError",
    "UnpicklableSourceError",
    "UnsupportedBackendError",
    "UnsafePickleError",
    "UnsupportedVersionError",
    "WorkerDiedError",
    "WorkerLostError",
]


class MlworkflowAsyncError(Exception):
    """The base of every error the library raises on purpose."""


class KeysNotReadyError(MlworkflowAsyncError, RuntimeError):
    """The length of a dataset was asked for before its keys were all known.

    Keys of lazy datasets are discovered as they are iterated. Complete them
    with ``await dataset.keys.all()`` (or ``dataset.sync.keys.all()``) first.
    """


class SyncInLoopError(MlworkflowAsyncError, RuntimeError):
    """A blocking call was made from inside a running event loop.

    Blocking there would freeze the loop, so the blocking facades refuse.
    Use the async API (``await ...`` / ``async for ...``) instead.
    """


class UnsupportedBackendError(MlworkflowAsyncError, RuntimeError):
    """An asyncio-only part of the library was used under another async backend.

    ``SideRunner`` runs on asyncio: use it under ``asyncio.run(...)`` or
    ``anyio.run(...)`` with its default asyncio backend, not under trio.
    """


class RunnerClosedError(MlworkflowAsyncError, RuntimeError):
    """A ``SideRunner`` was used while it was not open.

    Work can only be handed to an async runner inside its ``async with``
    block, and to a blocking runner before ``close()``. Open the runner
    first (``async with SideRunner(4) as runner: ...``), or make a new one.
    """


class ItemCountError(MlworkflowAsyncError, RuntimeError):
    """A bulk fetch returned a different number of items than it was given keys.

    ``query_items(keys)`` must return one item per key, in order.
    """

    @classmethod
    def check(cls, owner: object, items: Sequence[Any], keys: Sequence[Any]) -> None:
        """Raise unless ``items`` has one item per key."""
        if len(items) != len(keys):
            raise cls(
                f"{type(owner).__name__}.query_items() returned {len(items)} items for "
                f"{len(keys)} keys; it must return one item per key, in order"
            )


class TooManyFailuresError(MlworkflowAsyncError, RuntimeError):
    """More items failed than ``max_failures`` allows in a stream skipping failures.

    ``failures`` lists every ``(key, exception)`` recorded; the message
    summarises them.
    """

    def __init__(self, message: str, failures: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.failures = list(failures)

    @classmethod
    def summarise(cls, failures: Sequence[Any], limit: float, seen: int) -> TooManyFailuresError:
        kinds: dict[str, int] = {}
        for failure in failures:
            name = type(failure.exception).__name__
            kinds[name] = kinds.get(name, 0) + 1
        allowed = f"{limit:.1%} of items" if isinstance(limit, float) else f"{limit}"
        first = failures[0] if failures else None
        detail = (
            f"; the first was key {first.key!r}: {type(first.exception).__name__}: "
            f"{first.exception}" if first is not None else ""
        )
        summary = ", ".join(f"{count} {name}" for name, count in sorted(kinds.items()))
        return cls(
            f"{len(failures)} of {seen} items failed ({summary}), more than max_failures="
            f"{allowed}{detail}",
            failures,
        )


class ResumeError(MlworkflowAsyncError, ValueError):
    """``batches(resume=state)`` got a state that does not match the stream asked for.

    The message names the argument that differs, or says that the keys
    changed since the state was saved.
    """


class UnhashableKeyError(MlworkflowAsyncError, TypeError):
    """A dataset that looks keys up (a cache, a filter, a subset) was given a key
    that cannot be hashed, such as a list.

    Keys must be hashable: a tuple instead of a list, say. The message names
    the key and the dataset.
    """

    @classmethod
    def check(cls, owner: object, keys: Iterable[Any]) -> None:
        """Raise for the first of ``keys`` that cannot be hashed; nothing if all can.

        Called after a ``TypeError``, which is re-raised as it is when every
        key hashes: the cost is paid on that failure only.
        """
        for key in keys:
            try:
                hash(key)
            except TypeError as exc:
                reason = str(exc)
            else:
                continue
            raise cls(
                f"key {key!r:.200} given to {type(owner).__name__} cannot be hashed "
                f"({reason}): keys must be hashable, e.g. a tuple instead of a list"
            )


class UnpicklableItemError(MlworkflowAsyncError, TypeError):
    """An item (or key, or context) could not be pickled while writing a file.

    The message names the key; the original error is the ``__cause__``.
    """


class PickledFileError(MlworkflowAsyncError, OSError):
    """A :class:`~mlworkflow_async.PickledDataset` file cannot be read.

    The base of the errors below; the message names the file (also in the
    ``path`` attribute) and what is wrong with it.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[type[PickledFileError], tuple[str, str | None]]:
        return type(self), (str(self), self.path)


class CorruptFileError(PickledFileError):
    """The file is not a PickledDataset file, or it is truncated or damaged.

    Raised for an empty or truncated file, random bytes, an index pointing
    outside the file, a file whose writer was interrupted, or an item that
    cannot be unpickled. Recreate the file from its source dataset.
    """


class UnsupportedVersionError(PickledFileError):
    """The file was written by a newer version of mlworkflow-async.

    Upgrade the library to read it.
    """


class KeyClassNotFoundError(PickledFileError):
    """The keys (or context) of the file are of a class that cannot be imported here.

    The message names the module or class the file needs: install or import
    the package that defines it (the one that wrote the file), then open the
    file again.
    """


class UnsafePickleError(PickledFileError):
    """In safe mode, the file asked to load something that is not allowed.

    Safe mode only rebuilds builtin containers and scalars, numpy arrays and
    the classes passed as ``allow=``. Pass the named class in ``allow`` if
    you trust it, or open the file without ``safe=True`` if you trust the file.
    """


class WorkerDiedError(MlworkflowAsyncError, RuntimeError):
    """A worker process died (killed, out of memory, crashed) while running a callable.

    The message names the callable and the key it was running. A pool made
    with ``executor="process"`` starts again for the next call; a process
    pool that was passed in is unusable afterwards and must be replaced.
    """


class UnpicklableSourceError(MlworkflowAsyncError, TypeError):
    """A dataset given to ``PickledDataset.create(..., client=...)`` cannot go to the workers.

    The dataset travels to worker processes pickled (with ``cloudpickle``);
    the message names the attribute that cannot be pickled. Nothing was
    written. The original error is the ``__cause__``.
    """


class WorkerLostError(WorkerDiedError):
    """A worker died while writing a shard of a sharded PickledDataset.

    The message names the shard. The dataset previously in the folder, if
    any, is left as it was; the files of the failed run are deleted.
    """


class RemoteFileError(PickledFileError):
    """A file behind a URL (``http(s)://`` or an fsspec URL) cannot be fetched.

    Raised when the server refuses the connection, does not answer byte-range
    requests, or keeps failing after the retries; the message names the URL
    (also in ``path``) and, for a read, the byte range and the key.
    """


class RemoteFileNotFoundError(RemoteFileError, FileNotFoundError):
    """The URL names no file (HTTP 404, or no such object). Check the URL."""


class RemoteFileChangedError(RemoteFileError):
    """The file behind the URL changed on the server while it was open.

    Its ETag (or size) no longer matches the one seen when it was opened, so
    its index no longer describes it. Open it again.
    """

