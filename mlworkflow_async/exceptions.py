"""Every exception class the library raises on purpose, in one flat module.

Errors raised by user code (a dataset's ``query_item``, a transform, a
predicate) are never wrapped: they propagate with their own type, and a note
naming the key that was being processed is added to them.
"""

from __future__ import annotations

__all__ = [
    "KeysNotReadyError",
    "RunnerClosedError",
    "SyncInLoopError",
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
