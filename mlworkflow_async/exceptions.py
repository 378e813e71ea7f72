"""Every exception class the library raises on purpose, in one flat module.

``PickledFileError`` (an ``OSError``) is the base of the file errors:
``CorruptFileError``, ``UnsupportedVersionError``, ``UnsafePickleError`` and
``RemoteFileError`` (a file behind a URL), itself the base of
``RemoteFileNotFoundError`` (also a ``FileNotFoundError``) and
``RemoteFileChangedError``.

Errors raised by user code (a dataset's ``query_item``, a transform, a
predicate) are never wrapped: they propagate with their own type, and a note
naming the key that was being processed is added to them.
"""

from __future__ import annotations

__all__ = [
    "CorruptFileError",
    "KeysNotReadyError",
    "PickledFileError",
    "RemoteFileChangedError",
    "RemoteFileError",
    "RemoteFileNotFoundError",
    "RunnerClosedError",
    "SyncInLoopError",
    "UnpicklableItemError",
    "UnsafePickleError",
    "UnsupportedVersionError",
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


class UnpicklableItemError(TypeError):
    """An item (or key, or context) could not be pickled while writing a file.

    The message names the key; the original error is the ``__cause__``.
    """
