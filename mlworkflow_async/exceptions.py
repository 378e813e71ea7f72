"""Every exception class the library raises on purpose, in one flat module.

Errors raised by user code (a dataset's ``query_item``, a transform, a
predicate) are never wrapped: they propagate with their own type, and a note
naming the key that was being processed is added to them.
"""

from __future__ import annotations

__all__ = [
    "CorruptFileError",
    "KeysNotReadyError",
    "PickledFileError",
    "RunnerClosedError",
    "SyncInLoopError",
    "UnpicklableItemError",
    "UnpicklableSourceError",
    "UnsafePickleError",
    "UnsupportedVersionError",
    "WorkerLostError",
]


class KeysNotReadyError(RuntimeError):
    """The length of a dataset was asked for before its keys were all known.

    Keys of lazy datasets are discovered as they are iterated. Complete them
    with ``await dataset.keys.all()`` (or ``dataset.sync.keys.all()``) first.
    """


class SyncInLoopError(RuntimeError):
    """A blocking call was made from inside a running event loop.

    Blocking there would freeze the loop, so the blocking facades refuse.
    Use the async API (``await ...`` / ``async for ...``) instead.
    """


class RunnerClosedError(RuntimeError):
    """A ``SideRunner`` was used while it was not open.

    Work can only be handed to an async runner inside its ``async with``
    block, and to a blocking runner before ``close()``. Open the runner
    first (``async with SideRunner(4) as runner: ...``), or make a new one.
    """


class PickledFileError(OSError):
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


class UnsafePickleError(PickledFileError):
    """In safe mode, the file asked to load something that is not allowed.

    Safe mode only rebuilds builtin containers and scalars, numpy arrays and
    the classes passed as ``allow=``. Pass the named class in ``allow`` if
    you trust it, or open the file without ``safe=True`` if you trust the file.
    """


class UnpicklableItemError(TypeError):
    """An item (or key, or context) could not be pickled while writing a file.

    The message names the key; the original error is the ``__cause__``.
    """


class UnpicklableSourceError(TypeError):
    """A dataset given to ``PickledDataset.create(..., client=...)`` cannot go to the workers.

    The dataset travels to worker processes pickled (with ``cloudpickle``);
    the message names the attribute that cannot be pickled. Nothing was
    written. The original error is the ``__cause__``.
    """


class WorkerLostError(RuntimeError):
    """A worker process died while writing a shard of a sharded PickledDataset.

    The message names the shard. The dataset previously in the folder, if
    any, is left as it was; the files of the failed run are deleted.
    """
