"""The background event loop that powers every blocking facade.

One daemon thread per process runs an anyio ``BlockingPortal``. The sync view
of datasets and the blocking ``SideRunner`` submit their coroutines to it, so
the async code is the only implementation. The portal starts on first use,
stops at interpreter exit, and is recreated in a child process after ``fork``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
from contextlib import AbstractContextManager

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ..exceptions import SyncInLoopError

_lock = threading.Lock()
_portal: BlockingPortal | None = None
_portal_cm: AbstractContextManager[BlockingPortal] | None = None


def ensure_blocking_allowed(what: str, instead: str) -> None:
    """Raise :class:`SyncInLoopError` when called from a thread running an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise SyncInLoopError(
        f"{what} blocks, but it was called inside a running event loop, which it would "
        f"freeze. Use the async API instead: {instead}"
    )


def get_portal() -> BlockingPortal:
    """Return the process-wide portal, starting its thread if needed."""
    global _portal, _portal_cm
    with _lock:
        if _portal is None:
            cm = start_blocking_portal(backend="asyncio")
            _portal = cm.__enter__()
            _portal_cm = cm
        return _portal


def _shutdown() -> None:
    global _portal, _portal_cm
    with _lock:
        cm, _portal, _portal_cm = _portal_cm, None, None
    if cm is not None:
        # The loop thread may already be gone at interpreter teardown.
        with contextlib.suppress(RuntimeError):
            cm.__exit__(None, None, None)


# The parent's portal, kept in a forked child: dropping it would run its
# exit, which waits forever on a loop thread that does not exist there.
_inherited: list[AbstractContextManager[BlockingPortal]] = []


def _forget_after_fork() -> None:
    # The loop thread does not exist in the child; start afresh on next use.
    global _portal, _portal_cm, _lock
    _lock = threading.Lock()
    if _portal_cm is not None:
        _inherited.append(_portal_cm)
    _portal = None
    _portal_cm = None


atexit.register(_shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)
