"""Where CPU-heavy callables run: worker threads, worker processes or any executor.

One adapter, :class:`WorkerPool`, serves the combinators' CPU stages and
``SideRunner(executor=...)``. :func:`worker_pool` makes it from what a user
passes as ``executor``:

- ``"thread"``: a pool of ``workers`` threads, for work that releases the GIL
  (numpy, image decoding, compression), or any pure-Python work where Python
  runs without the GIL (``sys._is_gil_enabled()`` is False).
- ``"process"``: a pool of ``workers`` processes, for pure-Python work.
  Callables travel with cloudpickle, so lambdas and closures work; an
  ``async def`` callable runs in the worker's own event loop.
- any :class:`concurrent.futures.Executor`, or a ``dask.distributed.Client``
  (tasks are submitted with ``pure=False``: identical calls all run).

:meth:`WorkerPool.run_batch` hands a whole batch over in one hop per worker
(a hop costs ~100 µs to a thread and more to a process, so per-item hops
would cost more than many items do) and returns the results in order.

Large buffers (numpy arrays of at least 64 KiB) travel to and from worker
processes of this machine through shared memory, out of the pickle stream
(pickle protocol 5): the sender copies each array once into a segment under
``/dev/shm``, and the receiver's arrays are views of that segment, with no
copy and no trip through a pipe. The arrays of one chunk of results share one
segment, which lives as long as any of them does.

The same segment carries a small header through which the parent learns
which item a worker is running (so a dead worker is reported with the key
that killed it) and tells a worker to stop between items when the batch is
no longer wanted.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import contextlib
import glob
import itertools
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from ..exceptions import WorkerDiedError
from ._callables import describe, is_async_callable
from ._dask import ClientExecutor, is_dask_client

__all__ = ["WorkerPool", "worker_pool"]

#: Buffers at least this large travel through shared memory, smaller ones in the pickle.
_OUT_OF_BAND = 64 * 1024
#: Copying more than this into shared memory is done in a worker thread, off the loop.
_COPY_INLINE = 4 * 1024 * 1024
_ALIGN = 64
# Header of an input segment: the item being run (-1 before the first), the
# stop request, and the pid of the worker running the chunk.
_HEADER = _ALIGN
_PROGRESS, _STOP, _PID = range(3)

KINDS = ("thread", "process")


def _shm_dir() -> str | None:
    path = "/dev/shm"
    return path if os.path.isdir(path) and os.access(path, os.W_OK) else None


_SHM_DIR = _shm_dir()
_PREFIX = f"mlwa-{os.getpid()}-"
_names = itertools.count()


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# -- shared memory segments ---------------------------------------------------


def _create_segment(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _open_segment(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _unlink(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _unlink_leftovers() -> None:
    """Remove the segments this process made that no one removed (after a crash)."""
    if _SHM_DIR is not None:
        for path in glob.glob(os.path.join(_SHM_DIR, _PREFIX + "*")):
            _unlink(path)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _dumps(obj: Any, oob: list[pickle.PickleBuffer] | None) -> bytes:
    """Pickle ``obj``; large buffers go to ``oob`` rather than the stream."""
    callback = None
    if oob is not None:

        def callback(buffer: pickle.PickleBuffer) -> bool:
            if buffer.raw().nbytes < _OUT_OF_BAND:
                return True  # in the stream
            oob.append(buffer)
            return False

    try:
        return pickle.dumps(obj, protocol=5, buffer_callback=callback)
    except (pickle.PicklingError, TypeError, AttributeError):
        # Lambdas or local classes inside the data: cloudpickle handles them
        # (it is slower on plain data, so it is not the first choice).
        import cloudpickle

        if oob is not None:
            oob.clear()
        return cloudpickle.dumps(obj, protocol=5, buffer_callback=callback)  # type: ignore[no-any-return]


def _layout(buffers: list[pickle.PickleBuffer], start: int) -> tuple[list[tuple[int, int]], int]:
    spans = []
    offset = start
    for buffer in buffers:
        size = buffer.raw().nbytes
        spans.append((offset, size))
        offset = _aligned(offset + size)
    return spans, max(offset, start + 1)


def _fill(
    segment: mmap.mmap, buffers: list[pickle.PickleBuffer], spans: list[tuple[int, int]]
) -> None:
    for buffer, (offset, size) in zip(buffers, spans, strict=True):
        segment[offset : offset + size] = buffer.raw()


def _loads(payload: bytes, segment: mmap.mmap | None, spans: Sequence[tuple[int, int]]) -> Any:
    if not spans:
        return pickle.loads(payload)
    assert segment is not None
    view = memoryview(segment)
    return pickle.loads(payload, buffers=[view[o : o + n] for o, n in spans])


# -- the worker side ----------------------------------------------------------

_functions: dict[bytes, Callable[..., Any]] = {}
_local = threading.local()


def _function(blob: bytes) -> Callable[..., Any]:
    fn = _functions.get(blob)
    if fn is None:
        if len(_functions) >= 64:
            _functions.clear()
        fn = _functions[blob] = pickle.loads(blob)
    return fn


def _worker_loop() -> asyncio.AbstractEventLoop:
    """This worker thread's own event loop, made once, for ``async def`` callables."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    return loop


def _failure(index: int, exc: BaseException) -> tuple[Any, ...]:
    text = "".join(traceback.format_exception(exc))
    try:
        import cloudpickle

        blob = cloudpickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        # An exception that cannot travel: send what can be said about it.
        stand_in = RuntimeError(f"{type(exc).__qualname__}: {exc}")
        for note in getattr(exc, "__notes__", ()):
            stand_in.add_note(note)
        blob = pickle.dumps(stand_in)
    return ("err", index, blob, text)


def _call_all(
    fn: Callable[..., Any], chunk: list[tuple[Any, ...]], control: Any
) -> tuple[Any, ...]:
    """Run ``fn`` over ``chunk``: ``("ok", results)``, ``("err", index, exc)`` or ``("stopped",)``.

    ``control`` holds the slots of a segment's header (a list, in threads):
    the item being run is written there, and a stop request read, between items.
    """
    results: list[Any] = []
    if is_async_callable(fn):
        if control is not None:
            control[_PROGRESS] = -2  # items run concurrently: none in particular

        async def gather() -> list[Any]:
            return await asyncio.gather(*(fn(*args) for args in chunk), return_exceptions=True)

        results = _worker_loop().run_until_complete(gather())
        for index, value in enumerate(results):
            if isinstance(value, BaseException):
                return ("err", index, value)
        return ("ok", results)
    index = 0
    try:
        for index, args in enumerate(chunk):
            if control is not None:
                if control[_STOP]:
                    return ("stopped",)
                control[_PROGRESS] = index
            results.append(fn(*args))
    except Exception as exc:
        return ("err", index, exc)
    return ("ok", results)


def _run_shipped(
    blob: bytes, payload: bytes, spans: list[tuple[int, int]], segment_path: str | None
) -> tuple[Any, ...]:
    """In a worker: unpack a chunk, run it, pack the results."""
    segment = control = None
    if segment_path is not None:
        segment = _open_segment(segment_path)
        control = memoryview(segment)[:_HEADER].cast("q")
        control[_PID] = os.getpid()
    try:
        fn = _function(blob)
        chunk = _loads(payload, segment, spans)
        outcome = _call_all(fn, chunk, control)
        del chunk
        if outcome[0] == "err":
            return _failure(outcome[1], outcome[2])
        if outcome[0] == "stopped":
            return outcome
        buffers: list[pickle.PickleBuffer] | None = [] if segment_path is not None else None
        out = _dumps(outcome[1], buffers)
        if not buffers:
            return ("ok", out, [])
        assert segment_path is not None
        out_spans, size = _layout(buffers, 0)
        out_segment = _create_segment(segment_path + "-out", size)
        try:
            _fill(out_segment, buffers, out_spans)
        finally:
            buffers.clear()
            out_segment.close()
        return ("ok", out, out_spans)
    finally:
        if control is not None:
            control.release()


class _WorkerTraceback(Exception):
    """The traceback of an exception raised in another process, as text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nIn the worker:\n{self.text}"


# -- the adapter ---------------------------------------------------------------

_live: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_live):
        pool.close()
    _unlink_leftovers()


class _Chunk:
    """One hop: part of a batch handed to one worker, and what it needs cleaning."""

    __slots__ = ("fn", "future", "keys", "path", "segment", "start", "stop", "wrapped")

    def __init__(self, fn: Callable[..., Any], keys: Sequence[Any] | None, start: int) -> None:
        self.fn = fn
        self.keys = keys
        self.start = start
        self.future: cf.Future[Any] | None = None
        self.wrapped: asyncio.Future[Any] | None = None
        self.path: str | None = None
        self.segment: mmap.mmap | None = None
        # The header's slots, for a chunk run in a thread of this process.
        self.stop: list[int] = [-1, 0, 0]

    def name(self, index: int) -> str:
        """The item at ``index`` of the chunk, for messages."""
        if self.keys is not None:
            return f"key {self.keys[self.start + index]!r}"
        return f"call {self.start + index} of its batch"

    def control(self) -> Any:
        if self.segment is None or self.segment.closed:
            return None
        return memoryview(self.segment)[:_HEADER].cast("q")

    def progress(self) -> tuple[int, int]:
        """The index of the item being run (or -1, or -2 for all at once) and the worker pid."""
        control = self.control()
        if control is None:
            return self.stop[_PROGRESS], self.stop[_PID]
        try:
            return control[_PROGRESS], control[_PID]
        finally:
            control.release()

    def ask_to_stop(self) -> None:
        self.stop[_STOP] = 1
        control = self.control()
        if control is not None:
            control[_STOP] = 1
            control.release()

    def forget_output(self) -> None:
        """The results will not be read: remove their segment once the worker made it."""
        if self.path is not None and self.future is not None:
            out = self.path + "-out"
            self.future.add_done_callback(lambda _: _unlink(out))


class WorkerPool:
    """Runs callables over batches of arguments in threads, processes or an executor.

    >>> import asyncio
    >>> pool = worker_pool("thread", 2)
    >>> asyncio.run(pool.run_batch(pow, [(2, 3), (3, 2), (4, 0)]))
    [8, 9, 1]
    >>> pool.close()

    Pools it makes itself (``"thread"``, ``"process"``) start on first use,
    serve every later call, on any event loop, and end with :meth:`close` or
    :meth:`aclose` (or at exit); a closed pool starts again if used. An
    executor it was given is used as it is and never shut down.
    """

    def __init__(self, executor: Any, workers: int | None = None) -> None:
        self._owned: cf.Executor | None = None
        self._lock = threading.Lock()
        self._blobs: dict[int, tuple[Callable[..., Any], bytes]] = {}
        # Every chunk in flight, across calls: a dead worker is looked for among them.
        self._in_flight: set[_Chunk] = set()
        self._dead: dict[int, str] = {}
        self._death: tuple[cf.Executor, str] | None = None
        self._given: cf.Executor | None = None
        self._client: Any = None
        # Futures of a Dask client to cancel together (see _drop_remote).
        self._dropping: list[cf.Future[Any]] = []
        self._drop_sent: anyio.Event | None = None
        if executor in KINDS:
            if workers is not None and (
                isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
            ):
                raise ValueError(f"workers must be an integer of at least 1, got {workers!r}")
            self.kind: str = executor
            self.workers = workers or _default_workers()
        else:
            if workers is not None:
                raise ValueError(
                    f"workers={workers!r} only sizes the pools made for executor='thread' or "
                    f"'process'; size a {type(executor).__name__} when you make it"
                )
            if isinstance(executor, cf.Executor):
                self._given = executor
            elif is_dask_client(executor):
                self._client = executor
                self._given = ClientExecutor(executor)
            else:
                raise TypeError(
                    f"executor must be None, 'thread', 'process', a concurrent.futures.Executor "
                    f"or a dask.distributed Client, got {executor!r}"
                )
            given = self._given
            if isinstance(given, cf.ThreadPoolExecutor):
                self.kind = "thread"
            elif isinstance(given, cf.ProcessPoolExecutor):
                self.kind = "process"
            else:
                self.kind = "remote"
            self.workers = getattr(given, "_max_workers", 0) or 0
        if self.kind != "thread":
            _need_cloudpickle(executor)
        _live.add(self)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A dataset holding a pool may be pickled (to be sent to a cluster):
        # a pool of its own is made again there, lazily; an executor given
        # here stays here, and the copy runs its callables inline.
        if self._given is None:
            return WorkerPool, (self.kind, self.workers)
        return _no_pool, ()

    @property
    def in_threads(self) -> bool:
        """True when callables run in threads of this process (so async ones stay on the loop)."""
        return self.kind == "thread"

    def __repr__(self) -> str:
        where = self._given if self._given is not None else repr(self.kind)
        return f"<WorkerPool {where} workers={self.workers or '?'}>"

    # -- lifetime ---------------------------------------------------------

    def _make(self) -> cf.Executor:
        if self.kind == "thread":
            return cf.ThreadPoolExecutor(self.workers, thread_name_prefix="mlworkflow-async")
        # fork is unsafe in a process with threads (the loop's worker threads
        # may hold locks); forkserver forks from a clean single-threaded server.
        context: multiprocessing.context.BaseContext
        if "forkserver" in multiprocessing.get_all_start_methods():
            server = multiprocessing.get_context("forkserver")
            # The server imports this module once, so that each worker forked
            # from it starts in a fraction of a second instead of importing
            # numpy and the library again (measured 3 s against 0.2 s).
            server.set_forkserver_preload(["__main__", __name__])
            context = server
        else:  # pragma: no cover - not on Linux
            context = multiprocessing.get_context("spawn")
        return cf.ProcessPoolExecutor(self.workers, mp_context=context)

    def _executor(self) -> cf.Executor:
        if self._given is not None:
            return self._given
        with self._lock:
            if self._owned is None:
                self._owned = self._make()
            return self._owned

    @staticmethod
    def _filling(executor: cf.Executor) -> bool:
        """True while a process pool still starts processes (slow: done off the loop)."""
        if not isinstance(executor, cf.ProcessPoolExecutor):
            return False
        processes = getattr(executor, "_processes", None)
        limit = getattr(executor, "_max_workers", 0)
        return processes is None or len(processes) < limit

    async def _parallelism(self) -> int:
        if not self.workers and self._client is not None:
            threads = await anyio.to_thread.run_sync(self._client.nthreads)
            self.workers = max(1, sum(threads.values()))
        return self.workers or _default_workers()

    def close(self) -> None:
        """Shut down the pool this adapter made (waiting for running calls), if any."""
        with self._lock:
            owned, self._owned = self._owned, None
        if owned is not None:
            owned.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        """:meth:`close`, in a worker thread so that the loop goes on meanwhile."""
        if self._owned is not None:
            await anyio.to_thread.run_sync(self.close)

    def _recover(self, executor: cf.Executor) -> None:
        with self._lock:
            if self._owned is executor:
                self._owned = None
        executor.shutdown(wait=False, cancel_futures=True)

    # -- running ----------------------------------------------------------

    def _blob(self, fn: Callable[..., Any]) -> bytes:
        known = self._blobs.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        import cloudpickle

        blob: bytes = cloudpickle.dumps(fn)
        if len(self._blobs) >= 64:
            self._blobs.clear()
        self._blobs[id(fn)] = (fn, blob)  # holding fn keeps its id from being reused
        return blob

    async def run_batch(
        self,
        fn: Callable[..., Any],
        args_list: Sequence[tuple[Any, ...]],
        *,
        keys: Sequence[Any] | None = None,
        on_error: Callable[[BaseException, int], None] | None = None,
        wait_running: bool = False,
    ) -> list[Any]:
        """``[fn(*args) for args in args_list]``, computed by the workers, in order.

        The batch is split into one chunk per worker thread, or per idle
        worker process (whole when every process has a chunk of other
        batches already). An exception raised by
        ``fn`` propagates as it is (from a process, with the worker's
        traceback as its cause), after ``on_error(exc, index)`` has added
        notes; ``keys[index]`` names an item in messages. A worker process
        that dies raises :class:`~mlworkflow_async.exceptions.WorkerDiedError`
        naming the key it was running; a pool made here starts again for the
        next call. Cancelling drops the chunks not started and stops the
        running ones between items (``wait_running=True`` also waits for them).

        ``async def`` callables are awaited on the loop when the workers are
        threads, and run in each worker's own loop otherwise.
        """
        args_list = list(args_list)
        count = len(args_list)
        if not count:
            return []
        if self.in_threads and is_async_callable(fn):
            return await self._on_loop(fn, args_list, on_error)
        # Other processes: one chunk per idle worker, so that a batch arriving
        # while every worker is busy goes whole and pays the per-chunk costs
        # (shipping, results, a wake-up) once (benchmark CPU a). Threads cost
        # nothing per chunk: a batch is split over all of them, which keeps
        # them even at the end of a stream (CPU b).
        workers = await self._parallelism()
        if not self.in_threads:
            workers -= len(self._in_flight)
        parts = min(count, max(1, workers))
        bounds = [count * i // parts for i in range(parts + 1)]
        executor = self._executor()
        chunks = [_Chunk(fn, keys, start) for start in bounds[:-1]]
        self._in_flight.update(chunks)
        try:
            if self.kind != "thread" and (self._filling(executor) or _big_arrays(args_list)):
                # Starting worker processes, or copying much data, blocks for a
                # while: done from a thread, so that the loop goes on.
                await anyio.to_thread.run_sync(
                    self._start_and_submit, executor, fn, args_list, bounds, chunks
                )
            else:
                self._submit(executor, fn, args_list, bounds, chunks)
            return await self._gather(executor, args_list, on_error, chunks)
        finally:
            self._in_flight.difference_update(chunks)
            await self._settle(chunks, wait_running)

    async def _on_loop(
        self,
        fn: Callable[..., Any],
        args_list: list[tuple[Any, ...]],
        on_error: Callable[[BaseException, int], None] | None,
    ) -> list[Any]:
        results: list[Any] = [None] * len(args_list)

        async def call(index: int) -> None:
            try:
                results[index] = await fn(*args_list[index])
            except Exception as exc:
                if on_error is not None:
                    on_error(exc, index)
                raise

        try:
            async with anyio.create_task_group() as tg:
                for index in range(len(args_list)):
                    tg.start_soon(call, index)
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
        return results

    def _start_and_submit(self, executor: cf.Executor, *args: Any) -> None:
        if self._given is None and getattr(executor, "_executor_manager_thread", 0) is None:
            # A new pool of ours: start every worker now rather than one per
            # submission as work comes, so that the first batches use them all.
            with contextlib.suppress(AttributeError, AssertionError):
                executor._launch_processes()  # type: ignore[attr-defined]
        self._submit(executor, *args)

    def _submit(
        self,
        executor: cf.Executor,
        fn: Callable[..., Any],
        args_list: list[tuple[Any, ...]],
        bounds: list[int],
        chunks: list[_Chunk],
    ) -> None:
        direct = self.kind == "thread"
        blob = b"" if direct else self._blob(fn)
        local = self.kind == "process" and _SHM_DIR is not None
        for chunk, start, end in zip(chunks, bounds, bounds[1:], strict=False):
            part = args_list[start:end]
            if direct:
                chunk.future = executor.submit(_call_all, fn, part, chunk.stop)
                continue
            buffers: list[pickle.PickleBuffer] | None = [] if local else None
            payload = _dumps(part, buffers)
            spans: list[tuple[int, int]] = []
            if buffers is not None and _SHM_DIR is not None:
                spans, size = _layout(buffers, _HEADER)
                chunk.path = os.path.join(_SHM_DIR, f"{_PREFIX}{next(_names)}")
                chunk.segment = _create_segment(chunk.path, size)
                control = chunk.control()
                control[_PROGRESS] = -1
                control.release()
                _fill(chunk.segment, buffers, spans)
                buffers.clear()
            future = executor.submit(_run_shipped, blob, payload, spans, chunk.path)
            if chunk.path is not None:
                path = chunk.path
                future.add_done_callback(lambda _, path=path: _unlink(path))  # type: ignore[misc]
            chunk.future = future

    async def _gather(
        self,
        executor: cf.Executor,
        args_list: list[tuple[Any, ...]],
        on_error: Callable[[BaseException, int], None] | None,
        chunks: list[_Chunk],
    ) -> list[Any]:
        by_future: dict[asyncio.Future[Any], _Chunk] = {}
        for chunk in chunks:
            assert chunk.future is not None
            chunk.wrapped = _follow(chunk.future)
            by_future[chunk.wrapped] = chunk
        results: list[Any] = [None] * len(args_list)
        pending = set(by_future)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for wrapped in sorted(done, key=lambda w: by_future[w].start):
                chunk = by_future[wrapped]
                try:
                    outcome = wrapped.result()
                except BaseException as exc:
                    lost = await self._lost(exc, executor, chunk)
                    if lost is exc:
                        raise
                    raise lost from exc
                values = self._unpack(outcome, on_error, chunk)
                results[chunk.start : chunk.start + len(values)] = values
        return results

    def _unpack(
        self,
        outcome: tuple[Any, ...],
        on_error: Callable[[BaseException, int], None] | None,
        chunk: _Chunk,
    ) -> list[Any]:
        tag = outcome[0]
        if tag == "ok":
            if self.kind == "thread":
                values: list[Any] = outcome[1]
                return values
            payload, spans = outcome[1], outcome[2]
            segment = None
            if spans:
                assert chunk.path is not None
                out = chunk.path + "-out"
                try:
                    segment = _open_segment(out)
                finally:
                    _unlink(out)
            return list(_loads(payload, segment, spans))
        if tag == "err":
            index = chunk.start + outcome[1]
            if self.kind == "thread":
                exc: BaseException = outcome[2]
            else:
                exc = pickle.loads(outcome[2])
                exc.__cause__ = _WorkerTraceback(outcome[3])
            if on_error is not None:
                on_error(exc, index)
            raise exc
        raise RuntimeError(f"a chunk of {describe(chunk.fn)} stopped without being asked to")

    async def _lost(
        self, exc: BaseException, executor: cf.Executor, chunk: _Chunk
    ) -> BaseException:
        """The error for a chunk whose future failed by itself (not through its callable)."""
        broken = isinstance(exc, BrokenProcessPool)
        if not broken and type(exc).__name__ != "KilledWorker":
            return exc
        manager = getattr(executor, "_executor_manager_thread", None)
        if broken and manager is not None:
            # The pool ends its other workers as it breaks: once it is done,
            # their exit codes are settled and cannot be mistaken for the death.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(manager.join, 10.0)
        # Read how workers ended before the pool is let go (it forgets them then);
        # kept for the other calls that lose chunks to the same death.
        self._dead.update(_dead_pids(executor))
        if broken:
            self._recover(executor)
        again = (
            "the pool starts again for the next call"
            if self._given is None or self._client is not None
            else f"the executor {self._given!r} is unusable now: make a new one"
        )
        # The item that killed its worker: the one a chunk was running when
        # its process died of something else than the pool's own cleanup.
        dead = self._dead
        running = []
        for candidate in [chunk, *(c for c in self._in_flight if c is not chunk)]:
            progress, pid = candidate.progress()
            future = candidate.future
            finished = (
                future is not None and future.done() and not future.cancelled()
                and future.exception() is None
            )
            if progress != -1 and not finished:
                running.append((candidate, progress, pid))
        culprits = [r for r in running if r[2] in dead]
        # A death already told for this pool outranks a guess: the chunk that
        # caused it may have left the running ones before this call looks.
        told = self._death if broken and self._death and self._death[0] is executor else None
        if not culprits and told is None and len(running) == 1:
            culprits = running
        found: _Chunk | None = None
        if culprits:
            found, progress, pid = culprits[0]
            how = f" ({dead[pid]})" if pid in dead else ""
            if progress >= 0:
                where = f"on {found.name(progress)}"
            else:
                where = f"on one of {found.name(0)} and the rest of its chunk"
            cause = f"a worker process died{how} while running {describe(found.fn)} {where}"
            if broken:
                # Calls that see the same death later may no longer find the chunk.
                self._death = (executor, cause)
        elif told is not None:
            cause = told[1]
        else:
            cause = (
                f"a worker process died while running {describe(chunk.fn)} on {chunk.name(0)} "
                f"or another item of its chunk"
            )
            found = chunk
        message = cause
        if found is not chunk:
            message += f"; {describe(chunk.fn)} on {chunk.name(0)} and more was dropped"
        return WorkerDiedError(f"{message}; {again}")

    async def _settle(self, chunks: list[_Chunk], wait_running: bool) -> None:
        """Drop what is still queued or running, once the batch is done with."""
        running = []
        remote = []
        for chunk in chunks:
            future = chunk.future
            if future is None:
                continue
            if not future.done():
                if self.kind == "remote":
                    remote.append(future)
                elif not future.cancel():
                    chunk.ask_to_stop()
                    running.append(future)
            wrapped = chunk.wrapped
            if wrapped is not None:
                if not wrapped.done():
                    wrapped.cancel()
                elif not wrapped.cancelled():
                    wrapped.exception()  # seen: spare the "never retrieved" warning
            chunk.forget_output()
            if chunk.segment is not None:
                segment = chunk.segment
                future.add_done_callback(lambda _, s=segment: _close_quietly(s))  # type: ignore[misc]
        if remote and self._client is not None:
            with anyio.CancelScope(shield=True):
                await self._drop_remote(remote)
        elif remote:
            # Another executor's cancel may wait for a remote party (Dask's own
            # executor makes a round trip per future): never on the loop.
            with anyio.CancelScope(shield=True):
                running += await anyio.to_thread.run_sync(_cancel_each, remote)
        if wait_running and running:
            with anyio.CancelScope(shield=True):
                await asyncio.wait([asyncio.wrap_future(f) for f in running])

    async def _drop_remote(self, futures: list[cf.Future[Any]]) -> None:
        """Have the scheduler cancel ``futures``, with those of every batch settling now."""
        # The batches of a stream left early all settle in one turn of the
        # loop: the first waits for that turn to end, then sends every
        # batch's futures in one cancel message; the others wait for it.
        self._dropping.extend(futures)
        if self._drop_sent is not None:
            await self._drop_sent.wait()
            return
        sent = self._drop_sent = anyio.Event()
        try:
            await anyio.lowlevel.checkpoint()
            dropping, self._dropping, self._drop_sent = self._dropping, [], None
            executor = self._given
            assert isinstance(executor, ClientExecutor)
            # A client closed meanwhile cannot run the work either: nothing to report.
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(executor.drop, dropping)
        finally:
            sent.set()


def _no_pool() -> None:
    return None


def _need_cloudpickle(executor: Any) -> None:
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        raise ImportError(
            f"executor={executor!r} ships callables to other processes with cloudpickle, "
            f"which is not installed: pip install 'mlworkflow-async[process]'"
        ) from None


def _follow(future: cf.Future[Any]) -> asyncio.Future[Any]:
    """An asyncio future that follows ``future`` one way: cancelling it leaves ``future``.

    ``asyncio.wrap_future`` cancels the source from the loop, and the
    source's cancel may block (a remote executor's): :meth:`WorkerPool._settle`
    cancels sources itself, where it is safe.
    """
    loop = asyncio.get_running_loop()
    follower: asyncio.Future[Any] = loop.create_future()

    def copy(done: cf.Future[Any]) -> None:
        if follower.done():
            return
        if done.cancelled():
            follower.cancel()
        elif (exc := done.exception()) is not None:
            follower.set_exception(exc)
        else:
            follower.set_result(done.result())

    def settled(done: cf.Future[Any]) -> None:
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(copy, done)

    future.add_done_callback(settled)
    return follower


def _cancel_each(futures: list[cf.Future[Any]]) -> list[cf.Future[Any]]:
    """Cancel ``futures``; return those already running (which cannot be)."""
    return [future for future in futures if not future.cancel()]


def _close_quietly(segment: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):
        segment.close()


def _big_arrays(args_list: list[tuple[Any, ...]]) -> bool:
    """True when the batch holds more array bytes than are worth copying on the loop."""
    total = 0
    for args in args_list:
        for arg in args:
            total += getattr(arg, "nbytes", 0) if hasattr(arg, "__array_interface__") else 0
    return total > _COPY_INLINE


def _dead_pids(executor: cf.Executor) -> dict[int, str]:
    """Worker processes that died of something else than being terminated, with how."""
    processes = getattr(executor, "_processes", None) or {}
    dead: dict[int, str] = {}
    for pid, process in list(processes.items()):
        code = process.exitcode
        if code is None or code == -signal.SIGTERM:
            continue
        if code < 0:
            try:
                dead[pid] = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                dead[pid] = f"killed by signal {-code}"
        else:
            dead[pid] = f"exit code {code}"
    return dead


def worker_pool(executor: Any, workers: int | None = None) -> WorkerPool | None:
    """The adapter for a user's ``executor=`` argument; None for ``None`` (run on the loop)."""
    if executor is None:
        if workers is not None:
            raise ValueError(
                f"workers={workers!r} needs executor='thread' or 'process' to size"
            )
        return None
    if isinstance(executor, WorkerPool):
        return executor
    return WorkerPool(executor, workers)


if sys.platform == "win32":  # pragma: no cover
    _SHM_DIR = None
