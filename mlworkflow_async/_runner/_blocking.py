"""The blocking ``SideRunner`` for plain scripts, exposed as ``mlworkflow_async.sync.SideRunner``.

It is a thin layer over the async :class:`mlworkflow_async.SideRunner`: the
shared background loop (``_portal``) holds the runner's ``async with`` open
through anyio's ``BlockingPortal.wrap_async_context_manager``, from the
runner's creation to :meth:`SideRunner.close`, and every call is passed to
that loop. Handing work over does not wait for the loop; calls that return
something (``collect_runs``, iterating ``yield_async``) block.

Ctrl-C while blocked in a call, or an error in a ``with`` block, leaves the
async runner's block with that error, which cancels its work: queued calls
never start. A runner dropped without ``close()`` is closed once its work is
over, and one still open at interpreter exit is closed then, waiting for its
work, unless the program is dying of an uncaught exception (Ctrl-C included),
in which case its work is cancelled. Failures nobody saw are logged.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import contextlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar, overload

import anyio.to_thread

from .._core._callables import describe
from .._core._portal import ensure_blocking_allowed, get_portal
from ..exceptions import RunnerClosedError
from ._prefetch import Prefetcher
from ._side_runner import RunHandle, not_a_function
from ._side_runner import SideRunner as AsyncSideRunner

__all__ = ["SideRunner", "SyncPrefetcher"]

T = TypeVar("T")
P = ParamSpec("P")

_log = logging.getLogger("mlworkflow_async")

_INSTEAD = "`async with mlworkflow_async.SideRunner(...) as runner:`"
_POLL_SECONDS = 0.1


def _wait_for(future: cf.Future[T]) -> T:
    """``future.result()``, waking up now and then.

    A signal caught by another thread does not interrupt a lock wait, so an
    endless wait could hold Ctrl-C back until the work is over.
    """
    while not future.done():
        cf.wait((future,), timeout=_POLL_SECONDS)
    return future.result()


class _RunFuture(cf.Future[Any]):
    """A future that tells its run once its outcome was read.

    A failure read here has been seen, so closing the runner does not raise
    it a second time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.handle: RunHandle[Any] | None = None

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            self._note_read()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        finally:
            self._note_read()

    def _note_read(self) -> None:
        if self.handle is not None and self.done():
            self.handle._mark_retrieved()

    def __repr__(self) -> str:
        return "<Future" + super().__repr__().removeprefix("<" + type(self).__name__)


class _Core:
    """The open async runner and what hands it work; shared with the finalizer."""

    def __init__(self, runner: AsyncSideRunner) -> None:
        self.runner = runner
        self.portal = get_portal()
        self.lock = threading.Lock()
        self.closed = False  # no more work taken
        self.exited: cf.Future[None] | None = None  # the async block's exit, once begun
        self.outcome_read = False
        self.pid = os.getpid()
        # Calls handed over from threads, taken by the loop in batches: one
        # wake-up of the loop per batch rather than per call.
        self.inbox: list[tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any], Any]] = []
        self.block = self.portal.wrap_async_context_manager(runner)
        self.block.__enter__()
        self.loop: asyncio.AbstractEventLoop = self.portal.call(_running_loop)
        with _cores_lock:
            _cores.add(self)

    def check_process(self, what: str) -> None:
        if self.in_forked_child():
            raise RunnerClosedError(
                f"SideRunner.{what}() was called in a child process on a runner made in its "
                f"parent, whose event loop thread does not exist here; make a new SideRunner"
            )

    def check_open(self, what: str) -> None:
        self.check_process(what)
        if self.closed:
            raise RunnerClosedError(
                f"SideRunner.{what}() was called after close(); make a new SideRunner"
            )

    def submit(
        self,
        what: str,
        f: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: _RunFuture | None,
    ) -> None:
        if not callable(f):
            raise not_a_function(what, f)
        self.check_open(what)  # before the lock, which a fork may have copied held
        with self.lock:
            self.check_open(what)
            self.inbox.append((what, f, args, kwargs, future))
            if len(self.inbox) == 1:
                # Scheduled before any later collect_runs(), which thus sees this run.
                self.loop.call_soon_threadsafe(self._take_inbox)

    def _take_inbox(self) -> None:
        with self.lock:
            inbox, self.inbox = self.inbox, []
        for what, f, args, kwargs, future in inbox:
            try:
                run = self.runner._enqueue(what, f, args, kwargs, future is None, future)
            except Exception as exc:  # the runner was cancelled meanwhile
                if future is not None:
                    future.set_exception(exc)
                else:
                    _log.error("SideRunner.do(%s) was dropped", describe(f), exc_info=exc)
            else:
                if future is not None:
                    future.handle = run

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the loop and wait; Ctrl-C meanwhile cancels the runner."""
        self.check_process(getattr(fn, "__name__", "call"))
        future: cf.Future[Any] = self.portal.start_task_soon(fn, *args)
        try:
            return _wait_for(future)
        except KeyboardInterrupt as exc:
            future.cancel()
            self.abort(exc)
            raise

    def in_forked_child(self) -> bool:
        """True in a process forked from the one that made the runner."""
        return self.pid != os.getpid()

    def _exit(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leave the async runner's block once; later callers wait for that exit."""
        with self.lock:
            self.closed = True
            first = self.exited is None
            if first:
                self.exited = cf.Future()
            exited = self.exited
        assert exited is not None
        if first:
            try:
                self.block.__exit__(et, exc, tb)
            except BaseException as failure:
                exited.set_exception(failure)
            else:
                exited.set_result(None)
            finally:
                with _cores_lock:
                    _cores.discard(self)
        _wait_for(exited)

    def _claim_outcome(self) -> bool:
        """True for the one caller that is to report the runs' failures."""
        with self.lock:
            first, self.outcome_read = not self.outcome_read, True
        return first

    def close(self) -> None:
        if self.in_forked_child():
            return  # the work belongs to the parent process
        with self.lock:
            self.closed = True
        try:
            # Waited for here, where Ctrl-C can interrupt the wait, so that
            # leaving the block afterwards is quick.
            self.call(self.runner._wait_idle)
            self._exit(None, None, None)
        except KeyboardInterrupt:
            raise
        except BaseException:
            if self._claim_outcome():
                raise

    def abort(self, exc: BaseException) -> None:
        """Leave the block with ``exc``, which cancels all work; drop run failures."""
        if self.in_forked_child():
            return
        self.outcome_read = True
        with contextlib.suppress(Exception):
            self._exit(type(exc), exc, exc.__traceback__)

    def release(self) -> None:
        """Close without waiting: the runner was dropped without ``close()``."""
        if self.in_forked_child():
            return
        with self.lock:
            if self.closed:
                return
            self.closed = True
        with contextlib.suppress(RuntimeError):  # the portal is gone at exit
            self.portal.start_task_soon(self._close_when_idle)

    async def _close_when_idle(self) -> None:
        await self.runner._wait_idle()
        # Leaving the block blocks its caller, briefly now; at exit, where
        # Python 3.12 starts no thread, the exit hook closes the runner instead.
        with contextlib.suppress(RuntimeError):
            await anyio.to_thread.run_sync(self._close_and_log)

    def _close_and_log(self) -> None:
        try:
            self._exit(None, None, None)
        except BaseException as exc:
            if self._claim_outcome():
                _log.error("runs of a SideRunner that was never closed failed", exc_info=exc)


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


_cores_lock = threading.Lock()
_cores: set[_Core] = set()


def _close_all_at_exit() -> None:
    # Registered after the portal's own exit hook, so it runs before it.
    dying = getattr(sys, "last_value", None)
    with _cores_lock:
        cores = list(_cores)
    for core in cores:
        try:
            if dying is not None:
                core.abort(dying)
            else:
                core.close()
        except Exception as exc:
            _log.error("runs of a SideRunner left open at exit failed", exc_info=exc)


def _forget_after_fork() -> None:
    # The parent's loop thread does not exist in the child.
    global _cores_lock
    _cores_lock = threading.Lock()
    _cores.clear()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_forget_after_fork)


class SyncPrefetcher(Iterator[T], Generic[T]):
    """Blocking iterator returned by ``SideRunner.yield_async``.

    Items are fetched in the background while the loop body runs. ``close()``
    (or leaving a ``with`` block) stops the background work and closes the
    source; so does dropping the iterator.
    """

    __module__ = "mlworkflow_async.sync"  # public: exported there

    def __init__(self, prefetcher: Prefetcher[T], core: _Core) -> None:
        self._prefetcher = prefetcher
        self._core = core
        self._done = False

    def __repr__(self) -> str:
        return f"<blocking {repr(self._prefetcher).removeprefix('<')}"

    def __iter__(self) -> SyncPrefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        ensure_blocking_allowed("iterating SideRunner.yield_async()", "`async for`")
        try:
            item: T = self._core.call(self._prefetcher.__anext__)
            return item
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        """Stop the background work and close the source."""
        if not self._done:
            self._done = True
            ensure_blocking_allowed("SyncPrefetcher.close()", "`await prefetcher.aclose()`")
            if not self._core.in_forked_child():
                self._core.portal.call(self._prefetcher.aclose)

    def __enter__(self) -> SyncPrefetcher[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SideRunner:
    """Blocking twin of :class:`mlworkflow_async.SideRunner`, for plain scripts.

    Same calls, no ``await``: ``run_async`` returns a
    :class:`concurrent.futures.Future`, ``collect_runs()`` the list of
    results, ``yield_async`` a plain iterator; ``do`` forgets its run, whose
    error is raised by ``close()``. Use it in a
    ``with`` block, or call :meth:`close` (otherwise it is closed at exit).

    >>> from mlworkflow_async.sync import SideRunner
    >>> with SideRunner(4) as runner:
    ...     for x in range(5):
    ...         _ = runner.run_async(pow, x, 2)
    ...     squares = runner.collect_runs()
    ...     prefetched = list(runner.yield_async(iter("abc")))
    >>> squares, prefetched
    ([0, 1, 4, 9, 16], ['a', 'b', 'c'])

    It runs the async runner on a shared background event loop; calling it
    from inside a running event loop raises
    :class:`~mlworkflow_async.exceptions.SyncInLoopError`.
    """

    def __init__(self, pool_size: int = 1, executor: Any = None) -> None:
        ensure_blocking_allowed("mlworkflow_async.sync.SideRunner()", _INSTEAD)
        self._runner = AsyncSideRunner(pool_size, executor)
        self._core = _Core(self._runner)
        weakref.finalize(self, self._core.release)

    @property
    def pool_size(self) -> int:
        return self._runner.pool_size

    @property
    def executor(self) -> cf.Executor | None:
        return self._runner.executor

    def do(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Start ``f(*args, **kwargs)`` without waiting for it; errors come at close."""
        ensure_blocking_allowed("SideRunner.do()", _INSTEAD)
        self._core.submit("do", f, args, kwargs, None)

    @overload
    def run_async(
        self, f: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> cf.Future[T]: ...

    @overload
    def run_async(
        self, f: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> cf.Future[T]: ...

    def run_async(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Start ``f(*args, **kwargs)``; keep it pending for :meth:`collect_runs`."""
        ensure_blocking_allowed("SideRunner.run_async()", _INSTEAD)
        future = _RunFuture()
        self._core.submit("run_async", f, args, kwargs, future)
        return future

    def collect_runs(self, return_exceptions: bool = False) -> list[Any]:
        """Wait for every pending run; return their results in submission order."""
        ensure_blocking_allowed("SideRunner.collect_runs()", "`await runner.collect_runs()`")
        self._core.check_open("collect_runs")
        results: list[Any] = self._core.call(self._runner.collect_runs, return_exceptions)
        return results

    def yield_async(
        self,
        gen: Iterable[T] | AsyncIterable[T] | Callable[[], Iterable[T] | AsyncIterable[T]],
        in_advance: int = 1,
    ) -> SyncPrefetcher[T]:
        """Consume ``gen`` in the background, up to ``in_advance`` items ahead."""
        ensure_blocking_allowed(
            "SideRunner.yield_async()", "`async for ... in runner.yield_async()`"
        )
        self._core.check_open("yield_async")
        prefetcher: Prefetcher[T] = self._core.call(self._runner.yield_async, gen, in_advance)
        return SyncPrefetcher(prefetcher, self._core)

    def close(self) -> None:
        """Wait for the work still queued or going, then raise failures not yet reported."""
        ensure_blocking_allowed("SideRunner.close()", "leaving `async with SideRunner(...)`")
        self._core.close()

    def __enter__(self) -> SideRunner:
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            self._core.abort(exc)

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else "open"
        return f"<blocking SideRunner pool_size={self.pool_size} {state}>"
