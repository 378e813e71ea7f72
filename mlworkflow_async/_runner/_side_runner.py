"""Side work for async code: a task group whose concurrency is bounded.

A :class:`SideRunner` runs functions next to the code that hands them over,
at most ``pool_size`` at a time. ``async def`` functions are awaited on the
event loop; plain functions run in worker threads, or in any
``concurrent.futures`` executor (a process pool, a Dask cluster) when one is
given.

>>> import asyncio
>>> from mlworkflow_async import SideRunner
>>> async def square(x):
...     return x * x
>>> async def main():
...     async with SideRunner(2) as runner:
...         for x in range(5):
...             runner.run_async(square, x)
...         return await runner.collect_runs()
>>> asyncio.run(main())
[0, 1, 4, 9, 16]

Queued calls are small entries in a queue, not tasks: ``pool_size`` worker
tasks take them in order, so handing over a million calls costs a million
small objects and ``pool_size`` tasks. For scripts without an event loop,
:class:`mlworkflow_async.sync.SideRunner` offers the same calls, blocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import reprlib
import threading
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Generator, Iterable
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar, overload

import anyio
import anyio.to_thread

from .._core._callables import describe, is_async_callable
from .._core._portal import running_loop_library
from ..exceptions import RunnerClosedError, UnsupportedBackendError
from . import _wakeup
from ._prefetch import Prefetcher, _Channel, _stop, check_source, produce

__all__ = ["SideRunner", "RunHandle"]

T = TypeVar("T")
P = ParamSpec("P")

_QUEUED, _RUNNING, _DONE, _FAILED, _CANCELLED = range(5)
_NO_KWARGS: dict[str, Any] = {}
# Runs that finish without suspending would otherwise starve the loop.
_YIELD_EVERY = 64
_THREAD_RETRY_SECONDS = 0.002

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40


def _call_repr(fn: object, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> str:
    parts = [_repr.repr(a) for a in args[:4]]
    if len(args) > 4:
        parts.append("...")
    parts += [f"{k}={_repr.repr(v)}" for k, v in (kwargs or {}).items()]
    return f"{describe(fn)}({', '.join(parts)})"


class RunHandle(Generic[T]):
    """A call handed to :meth:`SideRunner.run_async`; ``await`` it for its result.

    A handle is a small queue entry until a worker picks it up. Awaiting it
    returns the function's result or raises its exception; awaiting a
    cancelled run raises :class:`concurrent.futures.CancelledError`.
    """

    __module__ = "mlworkflow_async"  # public: exported there
    __slots__ = (
        "_args",
        "_detached",
        "_event",
        "_fn",
        "_future",
        "_kwargs",
        "_retrieved",
        "_state",
        "_value",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        detached: bool,
        future: cf.Future[Any] | None,
    ) -> None:
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._detached = detached
        self._future = future
        self._state = _QUEUED
        self._value: Any = None
        self._event: asyncio.Event | None = None
        self._retrieved = False

    def done(self) -> bool:
        """True once the run has finished, failed or been cancelled."""
        return self._state >= _DONE

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def cancel(self) -> bool:
        """Drop the run if it has not started yet; return whether it is cancelled.

        A run already going is left to finish, as with ``concurrent.futures``.
        """
        if self._state == _QUEUED:
            self._finish(_CANCELLED, None)
        return self._state == _CANCELLED

    def result(self) -> T:
        """The result of a finished run (raises its exception if it failed)."""
        if self._state < _DONE:
            raise asyncio.InvalidStateError(f"{self!r} has not finished yet: await it")
        self._retrieved = True
        if self._state == _DONE:
            value: T = self._value
            return value
        if self._state == _FAILED:
            raise self._value
        raise cf.CancelledError(f"the run of {describe(self._fn)} was cancelled")

    def __await__(self) -> Generator[Any, None, T]:
        if self._state < _DONE:
            yield from self._wait().__await__()
        return self.result()

    async def _wait(self) -> None:
        if self._state < _DONE:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()

    def _start(self) -> bool:
        if self._state != _QUEUED:
            return False
        future = self._future
        if future is not None and not future.set_running_or_notify_cancel():
            self._state = _CANCELLED  # cancelled through its future, which knows already
            self._wake()
            return False
        self._state = _RUNNING
        return True

    def _finish(self, state: int, value: Any) -> None:
        was_running = self._state == _RUNNING
        self._state = state
        self._value = value
        self._args, self._kwargs = (), None  # free the arguments early
        self._wake()
        future = self._future
        if future is None:
            return
        try:
            if state == _DONE:
                future.set_result(value)
            elif state == _FAILED:
                future.set_exception(value)
            elif was_running:
                future.set_exception(cf.CancelledError("the SideRunner was cancelled"))
            elif future.cancel():
                future.set_running_or_notify_cancel()
        except (cf.InvalidStateError, RuntimeError):
            pass  # the future was settled from its own side meanwhile

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()

    def _mark_retrieved(self) -> None:
        self._retrieved = True

    def __repr__(self) -> str:
        state = ("queued", "running", "done", "failed", "cancelled")[self._state]
        return f"<RunHandle {describe(self._fn)} {state}>"


class _Session:
    """Everything that lives from entering a runner to leaving it."""

    __slots__ = (
        "active",
        "cancelled",
        "failures",
        "idle",
        "limiter",
        "loop",
        "pending",
        "producers",
        "queue",
        "wakeup",
        "workers",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool_size: int) -> None:
        self.loop = loop
        self.queue: deque[RunHandle[Any]] = deque()
        self.pending: list[RunHandle[Any]] = []
        self.workers: dict[asyncio.Task[None], anyio.CancelScope | None] = {}
        self.producers: dict[asyncio.Task[None], _Channel] = {}
        self.active = 0
        self.failures: list[BaseException] = []  # from runs started with do()
        self.idle = asyncio.Event()
        # Our own limiter: anyio's default one is shared by the whole program.
        self.limiter = anyio.CapacityLimiter(pool_size)
        self.cancelled = False
        self.wakeup = _wakeup.hold(loop)  # so that Ctrl-C reaches a sleeping loop

    def forget_worker(self, task: asyncio.Task[None]) -> None:
        self.workers.pop(task, None)
        if not self.workers:
            self.idle.set()

    def forget_producer(self, task: asyncio.Task[None]) -> None:
        self.producers.pop(task, None)

    async def wait_idle(self) -> None:
        while self.workers or self.queue:
            self.idle.clear()
            await self.idle.wait()

    def unreported_failures(self) -> list[BaseException]:
        failures = list(self.failures)
        failures += [r._value for r in self.pending if r._state == _FAILED and not r._retrieved]
        return failures


async def _wait_all(tasks: list[asyncio.Task[None]]) -> None:
    """Wait until ``tasks`` are done, even if we are cancelled meanwhile."""
    cancelled = False
    remaining = set(tasks)
    with anyio.CancelScope(shield=True):
        while remaining:
            try:
                _, remaining = await asyncio.wait(remaining)
            except asyncio.CancelledError:
                cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _as_executor(executor: Any) -> cf.Executor | None:
    if executor is None or isinstance(executor, cf.Executor):
        return executor
    # A dask.distributed Client; by duck typing so that dask stays optional.
    # Side work is usually not pure: identical calls must all run.
    get_executor = getattr(executor, "get_executor", None)
    if callable(get_executor):
        made: cf.Executor = get_executor(pure=False)
        return made
    if callable(getattr(executor, "submit", None)):
        return executor  # type: ignore[no-any-return]
    raise TypeError(
        f"executor must be a concurrent.futures.Executor or a dask.distributed Client, "
        f"got {type(executor).__name__}"
    )


def not_a_function(what: str, f: object) -> TypeError:
    """The error for ``do``/``run_async`` given something that cannot be called."""
    if inspect.iscoroutine(f):
        f.close()  # never to be awaited: spare the "never awaited" warning
        return TypeError(
            f"SideRunner.{what}() was given a coroutine, {f.__qualname__}(...), already "
            f"called. Pass the function and its arguments instead: "
            f"{what}({f.__qualname__}, arg, ...)"
        )
    return TypeError(f"SideRunner.{what}() needs a function first, got {f!r}")


def _single_or_group(failures: list[BaseException], what: str) -> BaseException:
    if len(failures) == 1:
        return failures[0]
    return BaseExceptionGroup(what, failures)


class SideRunner:
    """Run functions on the side, at most ``pool_size`` at a time.

    Use it as ``async with SideRunner(pool_size) as runner:``:

    - ``runner.do(f, *args, **kwargs)`` starts ``f`` and forgets it; if it
      fails, leaving the ``async with`` raises the error.
    - ``runner.run_async(f, ...)`` returns a :class:`RunHandle` to ``await``;
      ``await runner.collect_runs()`` returns the results of all pending
      runs in submission order.
    - ``runner.yield_async(gen, in_advance=1)`` consumes a generator in the
      background, up to ``in_advance`` items ahead of the ``async for``.

    ``f`` may be an ``async def`` function (awaited on the loop) or a plain
    function (run in a worker thread, or submitted to ``executor`` when one
    is given: any ``concurrent.futures.Executor``, or a
    ``dask.distributed.Client``).

    Leaving the block waits for the work still queued or going. An error in
    the block, or cancellation of the enclosing scope, cancels it instead:
    queued calls never start and async runs are cancelled. Python cannot
    stop a thread or a process already running a plain function: leaving
    then waits for it to return and drops its result. Long plain functions
    can call ``anyio.from_thread.check_cancelled()`` now and then to stop
    early.

    >>> import asyncio
    >>> async def main():
    ...     async with SideRunner(3) as runner:
    ...         handle = runner.run_async(sum, [1, 2, 3])
    ...         items = [x async for x in runner.yield_async(range(3))]
    ...         return await handle, items
    >>> asyncio.run(main())
    (6, [0, 1, 2])
    """

    def __init__(self, pool_size: int = 1, executor: Any = None) -> None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an integer of at least 1, got {pool_size!r}")
        self.pool_size = pool_size
        self.executor = _as_executor(executor)
        self._session: _Session | None = None

    # -- opening and closing ----------------------------------------------

    async def __aenter__(self) -> SideRunner:
        if self._session is not None:
            raise RuntimeError(
                "this SideRunner is already open; leave its `async with` block before "
                "entering it again, or make another runner"
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise UnsupportedBackendError(
                f"SideRunner needs asyncio, but it was entered under "
                f"{running_loop_library() or 'another event loop'}; run the program with "
                f"asyncio.run(main()) or anyio.run(main) (asyncio is anyio's default backend)"
            ) from None
        self._session = _Session(loop, self.pool_size)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self._session
        if session is None:
            return
        try:
            if et is None:
                try:
                    await session.wait_idle()
                except BaseException:
                    await self._cancel(session)
                    raise
                await self._stop_producers(session)
            else:
                await self._cancel(session)
        finally:
            self._session = None
            if session.wakeup:
                _wakeup.release()
        failures = session.unreported_failures()
        if not failures:
            return
        if et is None:
            raise _single_or_group(failures, f"{len(failures)} SideRunner runs failed")
        if isinstance(exc, Exception):
            exc.add_note(
                f"meanwhile {len(failures)} SideRunner run(s) failed: "
                + "; ".join(repr(f) for f in failures[:5])
            )

    async def _wait_idle(self) -> None:
        """Wait until no work is queued or going (for the blocking twin's close)."""
        session = self._session
        if session is not None:
            await session.wait_idle()

    async def _cancel(self, session: _Session) -> None:
        session.cancelled = True
        queue = session.queue
        while queue:
            queue.popleft()._finish(_CANCELLED, None)
        for task, scope in session.workers.items():
            if scope is not None:
                scope.cancel()
            else:  # not started yet, so it has nothing to clean up
                task.cancel()
        for task, channel in session.producers.items():
            _stop(task, channel)
        await _wait_all([*session.workers, *session.producers])

    async def _stop_producers(self, session: _Session) -> None:
        for task, channel in session.producers.items():
            _stop(task, channel)
        await _wait_all(list(session.producers))

    def _open_session(self, what: str) -> _Session:
        session = self._session
        if session is None:
            raise RunnerClosedError(
                f"SideRunner.{what}() was called outside the runner's block; use it as "
                f"`async with SideRunner(...) as runner: runner.{what}(...)`"
            )
        if session.cancelled:
            raise RunnerClosedError(f"SideRunner.{what}() was called while the runner is cancelled")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not session.loop:
            raise RuntimeError(
                f"SideRunner.{what}() must be called from the event loop that entered the "
                f"runner; from plain threads, use mlworkflow_async.sync.SideRunner"
            )
        return session

    # -- handing work over ------------------------------------------------

    def do(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Start ``f(*args, **kwargs)`` without waiting for it.

        If it fails, the error is raised when the runner's block is left.
        """
        self._enqueue("do", f, args, kwargs, True, None)

    @overload
    def run_async(
        self, f: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> RunHandle[T]: ...

    @overload
    def run_async(
        self, f: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> RunHandle[T]: ...

    def run_async(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> RunHandle[Any]:
        """Start ``f(*args, **kwargs)`` and keep it pending for :meth:`collect_runs`."""
        return self._enqueue("run_async", f, args, kwargs, False, None)

    def _enqueue(
        self,
        what: str,
        f: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        detached: bool,
        future: cf.Future[Any] | None,
    ) -> RunHandle[Any]:
        session = self._open_session(what)
        if not callable(f):
            raise not_a_function(what, f)
        run: RunHandle[Any] = RunHandle(f, args, kwargs or None, detached, future)
        queue = session.queue
        queue.append(run)
        if not detached:
            session.pending.append(run)
        workers = session.workers
        # Spawn only when the idle workers are too few for the queue.
        if len(workers) < self.pool_size and len(workers) < session.active + len(queue):
            task = session.loop.create_task(self._work(session))
            workers[task] = None
            session.idle.clear()
            task.add_done_callback(session.forget_worker)
        return run

    async def collect_runs(self, return_exceptions: bool = False) -> list[Any]:
        """Wait for every pending run; return their results in submission order.

        The pending list is then empty. If runs failed, the others are still
        waited for, then an ``ExceptionGroup`` of their failures is raised.
        With ``return_exceptions=True`` the exceptions take the place of
        results. Only the runs of :meth:`run_async` are collected: a failed
        :meth:`do` run is raised when the runner's block is left.
        """
        session = self._open_session("collect_runs")
        runs, session.pending = session.pending, []
        try:
            for run in runs:
                await run._wait()
        except BaseException:
            session.pending[:0] = runs  # still pending: not lost if we are cancelled
            raise
        results: list[Any] = []
        failures: list[BaseException] = []
        for run in runs:
            try:
                results.append(run.result())
            except Exception as exc:
                if not return_exceptions:
                    failures.append(exc)
                results.append(exc)
        if return_exceptions:
            return results
        if failures:
            raise BaseExceptionGroup(f"{len(failures)} of {len(runs)} runs failed", failures)
        return results

    def yield_async(
        self,
        gen: Iterable[T] | AsyncIterable[T] | Callable[[], Iterable[T] | AsyncIterable[T]],
        in_advance: int = 1,
    ) -> Prefetcher[T]:
        """Consume ``gen`` in the background, up to ``in_advance`` items ahead.

        ``gen`` is a generator or any (async) iterable, or a function taking
        no argument that returns one. A sync source's ``next()`` runs in a
        worker thread. Use the result with ``async for``; breaking out of it
        stops the background work and closes ``gen``. The producer does not
        take one of the ``pool_size`` slots.
        """
        session = self._open_session("yield_async")
        if isinstance(in_advance, bool) or not isinstance(in_advance, int) or in_advance < 0:
            raise ValueError(f"in_advance must be an integer >= 0, got {in_advance!r}")
        check_source(gen)
        channel = _Channel(in_advance)
        task = session.loop.create_task(produce(channel, gen))
        session.producers[task] = channel
        task.add_done_callback(session.forget_producer)
        return Prefetcher(session.loop, channel, task, describe(gen))

    # -- the workers ------------------------------------------------------

    async def _work(self, session: _Session) -> None:
        task = asyncio.current_task()
        assert task is not None
        queue = session.queue
        try:
            with anyio.CancelScope() as scope:
                session.workers[task] = scope
                streak = 0
                while queue:
                    run = queue.popleft()
                    if not run._start():
                        continue
                    session.active += 1
                    try:
                        value = await self._execute(run, session)
                    except BaseException as exc:
                        if isinstance(exc, asyncio.CancelledError) and (
                            scope.cancel_called or task.cancelling()
                        ):
                            run._finish(_CANCELLED, None)
                            raise
                        exc.add_note(
                            f"in SideRunner run {_call_repr(run._fn, run._args, run._kwargs)}"
                        )
                        run._finish(_FAILED, exc)
                        if run._detached:
                            session.failures.append(exc)
                    else:
                        run._finish(_DONE, value)
                    finally:
                        session.active -= 1
                    streak += 1
                    if streak == _YIELD_EVERY:
                        streak = 0
                        await asyncio.sleep(0)
        finally:
            session.forget_worker(task)

    async def _execute(self, run: RunHandle[Any], session: _Session) -> Any:
        fn, args, kwargs = run._fn, run._args, run._kwargs or _NO_KWARGS
        if is_async_callable(fn):
            return await fn(*args, **kwargs)
        executor = self.executor
        if executor is not None:
            return await _in_executor(executor, fn, args, kwargs)
        result = await _in_thread(fn, args, kwargs, session.limiter)
        if inspect.isawaitable(result):
            result = await result
        return result

    def __repr__(self) -> str:
        session = self._session
        if session is None:
            return f"<SideRunner pool_size={self.pool_size} closed>"
        return (
            f"<SideRunner pool_size={self.pool_size} running={session.active} "
            f"queued={len(session.queue)} pending={len(session.pending)}>"
        )


async def _in_thread(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limiter: anyio.CapacityLimiter,
) -> Any:
    """``fn(*args, **kwargs)`` in a worker thread.

    Once the interpreter is shutting down, Python 3.12 refuses to start
    threads, even in exit hooks: the run then waits for a worker thread that
    exists already (the blocking runners' loop always keeps one), so that
    work handed over just before exit still runs to its end.
    """
    started = False

    def call() -> Any:
        nonlocal started
        started = True
        return fn(*args, **kwargs)

    while True:
        try:
            return await anyio.to_thread.run_sync(call, limiter=limiter)
        except RuntimeError as exc:
            if started or not _threads_refused(exc):
                raise
        await anyio.sleep(_THREAD_RETRY_SECONDS)


def _threads_refused(exc: RuntimeError) -> bool:
    return "interpreter shutdown" in str(exc) and any(
        t.name == "AnyIO worker thread" for t in threading.enumerate()
    )


async def _in_executor(
    executor: cf.Executor, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    future = executor.submit(fn, *args, **kwargs)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if not future.cancel():
            # Already running elsewhere: wait, so that nothing outlives the runner.
            with anyio.CancelScope(shield=True):
                await asyncio.wait([asyncio.wrap_future(future)])
        raise
