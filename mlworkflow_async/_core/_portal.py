"""The background event loop that powers every blocking facade.

One daemon thread per process runs an anyio ``BlockingPortal``, leased from a
``BlockingPortalProvider``. The sync view of datasets and the blocking
``SideRunner`` submit their coroutines to it, so the async code is the only
implementation. The portal starts on first use, stops at interpreter exit,
and is recreated in a child process after ``fork``.

A blocking call made in a thread whose event loop is running would freeze
that loop, so it raises :class:`~mlworkflow_async.exceptions.SyncInLoopError`,
with two exceptions. Inside an IPython kernel (Jupyter), whose loop runs every
cell in the main thread, blocking calls are allowed: the work runs on the
portal's thread and never needs the kernel's loop, which a plain synchronous
cell holds for its whole length anyway. Other hosts of that kind opt in with
:func:`allow_blocking_in_loop` or the environment variable
``MLWORKFLOW_ASYNC_BLOCKING_IN_LOOP=1``. Nothing ever blocks the portal's own
thread, which would wait on itself.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal, BlockingPortalProvider

from ..exceptions import SyncInLoopError

ENV_ALLOW = "MLWORKFLOW_ASYNC_BLOCKING_IN_LOOP"
T = TypeVar("T")

_lock = threading.Lock()
_provider = BlockingPortalProvider(backend="asyncio")
_portal: BlockingPortal | None = None
_portal_thread: int | None = None
_loop: asyncio.AbstractEventLoop | None = None  # the portal's loop
_allowed: bool | None = None  # set by allow_blocking_in_loop(); None: ask the environment


def allow_blocking_in_loop(allow: bool | None = True) -> None:
    """Let blocking calls run in a thread whose event loop is running.

    For hosts that run a loop in the thread of plain synchronous code, as a
    Jupyter kernel does (detected without this call). The caller's loop is
    frozen while a blocking call waits; the work itself runs on the
    background loop. ``False`` refuses them everywhere, a kernel included;
    ``None``, the default state, allows them in a kernel, or anywhere when
    the environment has ``MLWORKFLOW_ASYNC_BLOCKING_IN_LOOP=1``.

    >>> from mlworkflow_async.sync import allow_blocking_in_loop
    >>> allow_blocking_in_loop()
    >>> allow_blocking_in_loop(None)
    """
    global _allowed
    _allowed = None if allow is None else bool(allow)


def in_ipython_kernel() -> bool:
    """True inside an IPython kernel (Jupyter); never imports IPython itself."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    if get_ipython is None:
        return False
    # Kernel shells have a kernel; the terminal shell has none.
    return getattr(get_ipython(), "kernel", None) is not None


def running_loop_library() -> str | None:
    """The async library whose loop runs in this thread: "asyncio", "trio" or None."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio"
    trio = sys.modules.get("trio")  # looked up only if the program uses trio
    if trio is not None and trio.lowlevel.in_trio_run():
        return "trio"
    return None


class EventLike(Protocol):
    """What :func:`new_event` returns, whichever library runs."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


def new_event() -> EventLike:
    """An event for the running loop: ``asyncio.Event`` under asyncio, else ``anyio.Event``.

    Both have ``set()``, ``is_set()`` and ``await wait()``. ``anyio.Event()``
    asks sniffio which library runs at each creation, which costs more than
    the event; the engine and key sequences make one per wait.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.Event()
    return asyncio.Event()


def _blocking_allowed() -> bool:
    if _allowed is not None:
        return _allowed
    return os.environ.get(ENV_ALLOW, "") not in ("", "0") or in_ipython_kernel()


def ensure_blocking_allowed(what: str, instead: str) -> None:
    """Raise :class:`SyncInLoopError` when called from a thread running an event loop."""
    library = running_loop_library()
    if library is None:
        return
    if threading.get_ident() == _portal_thread:
        raise SyncInLoopError(
            f"{what} blocks, but it was called on the background loop that runs the "
            f"blocking calls, which would wait on itself. Use the async API instead: {instead}"
        )
    if _blocking_allowed():
        return
    raise SyncInLoopError(
        f"{what} blocks, but it was called inside a running {library} event loop, which it "
        f"would freeze. Use the async API instead: {instead}. (Where freezing that loop is "
        f"intended, as in a notebook host, call mlworkflow_async.sync.allow_blocking_in_loop() "
        f"or set {ENV_ALLOW}=1.)"
    )


async def _warm_up() -> tuple[int, asyncio.AbstractEventLoop]:
    # One worker thread made now stays for good (anyio keeps the last idle
    # one), so work handed over just before exit still has a thread once the
    # interpreter refuses to start new ones.
    await anyio.to_thread.run_sync(int)
    return threading.get_ident(), asyncio.get_running_loop()


def get_portal() -> BlockingPortal:
    """Return the process-wide portal, starting its thread if needed."""
    global _portal, _portal_thread, _loop
    portal = _portal
    if portal is not None:
        return portal
    with _lock:
        if _portal is None:
            portal = _provider.__enter__()
            _portal_thread, _loop = portal.call(_warm_up)
            _portal = portal
        return _portal


def call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await fn(*args)`` on the background loop; block until it returns or raises.

    The coroutine goes to the loop as an asyncio task
    (``run_coroutine_threadsafe``) rather than through ``BlockingPortal.call``,
    whose task group and cancel scope per call cost a quarter more (benchmark
    W10: 134 against 167 µs a call here, most of it the two thread wake-ups;
    2.4x with the other core busy). The task is cancelled if the wait is
    interrupted (Ctrl-C), instead of running on unseen.

    >>> async def double(x):
    ...     return 2 * x
    >>> call(double, 21)
    42
    """
    get_portal()
    loop = _loop
    assert loop is not None
    if threading.get_ident() == _portal_thread:
        raise RuntimeError(
            "a blocking call was made on the background loop's own thread, where it would "
            "wait on itself: await the async API instead"
        )
    coroutine = _on_loop(fn, args)
    try:
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    except BaseException:
        coroutine.close()  # the loop is gone (interpreter exit): it never ran
        raise
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


async def _on_loop(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    # fn itself is called on the loop's thread, as BlockingPortal.call does.
    return await fn(*args)


def _shutdown() -> None:
    global _portal, _portal_thread, _loop
    with _lock:
        started, _portal, _portal_thread, _loop = _portal is not None, None, None, None
    if started:
        # The loop thread may already be gone at interpreter teardown.
        with contextlib.suppress(RuntimeError):
            _provider.__exit__(None, None, None)


# The parent's provider, kept in a forked child: dropping it would run its
# exit, which waits forever on a loop thread that does not exist there.
_inherited: list[BlockingPortalProvider] = []


def _forget_after_fork() -> None:
    # The loop thread does not exist in the child; start afresh on next use.
    global _portal, _portal_thread, _provider, _lock, _loop
    _lock = threading.Lock()
    if _portal is not None:
        _inherited.append(_provider)
        _provider = BlockingPortalProvider(backend="asyncio")
    _portal = None
    _portal_thread = None
    _loop = None


atexit.register(_shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)
