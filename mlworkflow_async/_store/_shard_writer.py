"""Writing a sharded PickledDataset in parallel: on a Dask cluster, a process pool, or here.

The keys are split into ``N`` contiguous parts, in key order; each part is
written as one shard file by the single-file ``PickledDataset.create`` (so
each shard is atomic), wherever the work runs. The dataset travels with
each shard's task, pickled with ``cloudpickle`` once, before any work
starts, so a dataset that cannot travel fails at once, naming the culprit.

A run writes its shards under names holding its run id, never over the
files the current manifest names; only when every shard is complete is the
new manifest written (temporary file, sync, rename) and the previous run's
shards deleted. A run that fails, is cancelled or loses a worker deletes its
own files and leaves the previous dataset as it was; what a killed writer
leaves behind is deleted by the next run that succeeds. One writer at a time
per folder.

Workers need the same folder at the same path (a shared filesystem when
they are on other machines) and ``mlworkflow-async`` installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import pickle
import re
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from .._core._dataset import Dataset
from ..exceptions import UnpicklableSourceError, WorkerLostError
from ._pickled import PickledDataset
from ._sharded import MANIFEST, ShardEntry, decode_manifest, encode_manifest, file_digest
from ._writes import AtomicFile

__all__ = ["create_sharded"]

#: How deep the search for the part of a dataset that cannot be pickled goes.
_CULPRIT_DEPTH = 8

Report = Callable[[int], None]


@dataclass(frozen=True)
class _ShardTask:
    index: int
    file: str
    path: str
    keys: list[Any]
    concurrency: int


def _shard_name(run: str, index: int) -> str:
    return f"shard-{run}-{index:05d}.pkl"


_RUN = r"\d{8}T\d{6}-[0-9a-f]{8}"
#: The files a run writes (shards and temporary files), and nothing a user would name so.
_OURS = re.compile(
    rf"shard-{_RUN}-\d{{5}}\.pkl|\.shard-{_RUN}-\d{{5}}\.pkl\.[0-9a-f]+\.tmp"
    r"|\.manifest\.json\.[0-9a-f]+\.tmp"
)


# -- in the worker --------------------------------------------------------------


class _Counted(Dataset[Any, Any]):
    """The source, reporting how many items it has fetched to the progress bar."""

    batched_queries = True

    def __init__(self, source: Dataset[Any, Any], report: Report) -> None:
        self._source = source
        self._report = report

    @property
    def context(self) -> Any:
        return getattr(self._source, "context", None)

    def yield_keys(self) -> Any:
        return self._source.keys

    async def query_item(self, key: Any) -> Any:
        return (await self.query_items([key]))[0]

    async def query_items(
        self, keys: Sequence[Any], concurrency: int | None = None
    ) -> list[Any]:
        source = self._source
        if source.batched_queries:  # a backend's own query_items may take keys only
            items = await source.query_items(keys)
        else:
            items = await source.query_items(keys, concurrency)
        self._report(len(keys))
        return items


async def _write_here(
    dataset: Dataset[Any, Any], task: _ShardTask, report: Report | None
) -> ShardEntry:
    source = dataset if report is None else _Counted(dataset, report)
    count = await PickledDataset.create(source, task.path, task.keys, concurrency=task.concurrency)
    if count != len(task.keys):
        raise RuntimeError(f"shard {task.path} got {count} items for {len(task.keys)} keys")
    size, digest = await anyio.to_thread.run_sync(file_digest, task.path)
    return ShardEntry(task.file, count, size, digest)


def _write_shard(blob: bytes, task: _ShardTask, report: Report | None) -> ShardEntry:
    """Runs in a worker process: rebuild the dataset, write one shard, digest it."""
    dataset = pickle.loads(blob)
    try:
        entry: ShardEntry = asyncio.run(_write_here(dataset, task, report))
    except BaseException as exc:
        _break_cycles(exc)
        raise
    return entry


def _break_cycles(exc: BaseException) -> None:
    """Drop hidden or circular links of an exception's chain, so that it can be pickled.

    An error re-raised out of an exception group keeps that group, which
    holds the error itself, as its hidden ``__context__``: a cycle that
    pickling tracebacks (as Dask does) cannot follow.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__suppress_context__ or (
            current.__context__ is not None and id(current.__context__) in seen
        ):
            current.__context__ = None
        if current.__cause__ is not None and id(current.__cause__) in seen:
            current.__cause__ = None
        current = current.__cause__ or current.__context__


class _DaskReport:
    """Progress from a Dask worker: an event on the run's topic, which the client follows."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def __call__(self, count: int) -> None:
        from distributed import get_worker

        get_worker().log_event(self.topic, count)


class _QueueReport:
    """Progress from a process of a pool: counts put on a queue the parent drains."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, count: int) -> None:
        self.queue.put(count)


# -- pickling the source ------------------------------------------------------------


def _dumps(dataset: object) -> bytes:
    try:
        import cloudpickle
    except ImportError:
        raise ImportError(
            "create(..., client=...) sends the dataset to other processes with cloudpickle: "
            "pip install 'mlworkflow-async[dask]'"
        ) from None
    try:
        blob: bytes = cloudpickle.dumps(dataset, protocol=5)
        return blob
    except Exception as exc:
        culprit = _culprit(cloudpickle.dumps, dataset, "dataset", 0, set())
        raise UnpicklableSourceError(
            f"the dataset {type(dataset).__name__} cannot be sent to the workers: "
            f"{culprit or 'it'} cannot be pickled ({type(exc).__name__}: {exc}). Make it "
            f"picklable (open files, locks and connections in the worker, or give its class "
            f"__getstate__/__setstate__), or create the shards in this process "
            f"(no client)"
        ) from exc


def _children(obj: object, path: str) -> Iterable[tuple[object, str]]:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield key, f"{path} key {key!r}"
            yield value, f"{path}[{key!r}]"
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for index, value in enumerate(obj):
            yield value, f"{path}[{index}]"
    else:
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            for name, value in state.items():
                yield value, f"{path}.{name}"
        for name in getattr(type(obj), "__slots__", ()):
            if isinstance(name, str) and hasattr(obj, name):
                yield getattr(obj, name), f"{path}.{name}"


def _culprit(
    dumps: Callable[[object], bytes], obj: object, path: str, depth: int, seen: set[int]
) -> str | None:
    """The deepest part of ``obj`` that fails to pickle, spelled as an attribute path."""
    if id(obj) in seen:
        return None
    seen.add(id(obj))
    try:
        dumps(obj)
        return None
    except Exception:
        pass
    if depth < _CULPRIT_DEPTH:
        with contextlib.suppress(Exception):  # an odd object: stop here
            for child, child_path in _children(obj, path):
                found = _culprit(dumps, child, child_path, depth + 1, seen)
                if found is not None:
                    return found
    return f"{path} (a {type(obj).__module__}.{type(obj).__qualname__})"


# -- where the shards are written ---------------------------------------------------------


class _Backend:
    """Runs the shard tasks somewhere; ``start`` returns one awaitable per task."""

    report: Report | None = None

    async def start(
        self, blob: bytes, tasks: list[_ShardTask]
    ) -> list[asyncio.Future[ShardEntry]]:
        raise NotImplementedError

    async def stop(self, failed: bool) -> None:
        """Release what the run used; on failure, cancel what has not finished."""


class _DaskBackend(_Backend):
    def __init__(self, client: Any, run: str, bar: Any) -> None:
        self.client = client
        self.asynchronous = bool(getattr(client, "asynchronous", False))
        self.futures: list[Any] = []
        self.topic: str | None = None
        if bar is not None:
            self.topic = f"mlworkflow-async-progress-{run}"
            self.report = _DaskReport(self.topic)
            client.subscribe_topic(self.topic, lambda event: bar.update(event[1]))
        self.run = run

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.asynchronous:
            return await method(*args, **kwargs)
        return await anyio.to_thread.run_sync(lambda: method(*args, **kwargs))

    async def start(
        self, blob: bytes, tasks: list[_ShardTask]
    ) -> list[asyncio.Future[ShardEntry]]:
        # The pickled dataset goes in each task rather than scattered once:
        # a task must stay runnable elsewhere whatever workers die (the
        # scheduler cannot recompute scattered data a dead worker held).
        self.futures = [
            self.client.submit(
                _write_shard, blob, task, self.report,
                key=f"mlworkflow-async-shard-{self.run}-{task.index}", pure=False,
            )
            for task in tasks
        ]
        if self.asynchronous:
            async def settle(future: Any) -> ShardEntry:
                entry: ShardEntry = await future
                return entry

            return [asyncio.ensure_future(settle(future)) for future in self.futures]
        loop = asyncio.get_running_loop()
        return [asyncio.wrap_future(_settled(future), loop=loop) for future in self.futures]

    async def stop(self, failed: bool) -> None:
        if self.topic is not None:
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic(self.topic)
        if failed and self.futures:
            with contextlib.suppress(Exception):
                await self._call(self.client.cancel, self.futures, force=True)


def _settled(future: Any) -> concurrent.futures.Future[ShardEntry]:
    """A concurrent future settled with a (blocking client's) Dask future's outcome."""
    out: concurrent.futures.Future[ShardEntry] = concurrent.futures.Future()

    def done(future: Any) -> None:  # in Dask's callback thread
        try:
            if future.status == "finished":
                out.set_result(future.result())
            elif future.status == "cancelled":
                out.cancel()
            else:
                out.set_exception(future.exception())
        except BaseException as exc:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                out.set_exception(exc)

    future.add_done_callback(done)
    return out


class _ExecutorBackend(_Backend):
    def __init__(self, executor: concurrent.futures.Executor | None, shards: int, bar: Any) -> None:
        self.owned = executor is None
        context = multiprocessing.get_context(
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        )
        if executor is None:
            workers = max(1, min(shards, os.cpu_count() or 1))
            executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
        self.executor = executor
        self.futures: list[concurrent.futures.Future[ShardEntry]] = []
        self.manager: Any = None
        self.drain: threading.Thread | None = None
        if bar is not None:
            self.manager = context.Manager()
            queue = self.manager.Queue()
            self.report = _QueueReport(queue)
            self.drain = threading.Thread(target=_drain, args=(queue, bar), daemon=True)
            self.drain.start()

    async def start(
        self, blob: bytes, tasks: list[_ShardTask]
    ) -> list[asyncio.Future[ShardEntry]]:
        self.futures = [
            self.executor.submit(_write_shard, blob, task, self.report) for task in tasks
        ]
        loop = asyncio.get_running_loop()
        return [asyncio.wrap_future(future, loop=loop) for future in self.futures]

    async def stop(self, failed: bool) -> None:
        for future in self.futures:
            future.cancel()
        if self.owned:
            executor = self.executor
            assert isinstance(executor, concurrent.futures.ProcessPoolExecutor)
            if failed:
                # Running shards would otherwise finish first: stop their processes.
                for process in list(getattr(executor, "_processes", {}).values()):
                    with contextlib.suppress(Exception):
                        process.terminate()
            await anyio.to_thread.run_sync(lambda: executor.shutdown(True, cancel_futures=True))
        if self.manager is not None:
            assert self.drain is not None
            assert isinstance(self.report, _QueueReport)
            with contextlib.suppress(Exception):
                self.report.queue.put(None)
            await anyio.to_thread.run_sync(self.drain.join, 5.0)
            await anyio.to_thread.run_sync(self.manager.shutdown)


def _drain(queue: Any, bar: Any) -> None:
    with contextlib.suppress(Exception):  # the manager went away
        while (count := queue.get()) is not None:
            bar.update(count)


def _is_dask_client(client: Any) -> bool:
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(client, distributed.Client)


def _check_client(client: Any) -> None:
    if not (
        client is None
        or (isinstance(client, str) and client == "process")
        or isinstance(client, concurrent.futures.Executor)
        or _is_dask_client(client)
    ):
        raise TypeError(
            f"client must be a dask.distributed.Client, a concurrent.futures.Executor or "
            f'"process", got {client!r}'
        )


def _backend(client: Any, run: str, shards: int, bar: Any) -> _Backend:
    if _is_dask_client(client):
        return _DaskBackend(client, run, bar)
    return _ExecutorBackend(None if isinstance(client, str) else client, shards, bar)


# -- the run ------------------------------------------------------------------------------


async def create_sharded(
    dataset: Dataset[Any, Any],
    folder: str | os.PathLike[str],
    keys: Iterable[Any] | AsyncIterable[Any] | None,
    *,
    shards: int | None,
    client: Any,
    concurrency: int,
    progress: bool,
) -> int:
    """Write ``dataset`` as ``shards`` files and a manifest in ``folder``; the number of items."""
    if shards is None:
        raise ValueError("create(..., client=...) needs shards=N, the number of shard files")
    if type(shards) is not int or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"a sharded dataset is written to a folder path, got {folder!r}")
    _check_client(client)
    out = os.path.join(os.getcwd(), os.fspath(folder))  # workers may have another cwd
    blob = b""
    if client is not None:  # before any work: a dataset that cannot travel fails now
        blob = await anyio.to_thread.run_sync(_dumps, dataset)
    all_keys = await _key_list(dataset, keys)
    context = getattr(dataset, "context", None)
    if not isinstance(context, Mapping):
        context = None
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
    tasks = await anyio.to_thread.run_sync(_plan, out, run, all_keys, shards, concurrency)
    bar = _progress_bar(progress, len(all_keys), out)
    committed = False
    try:
        if client is None:
            entries = [await _write_here(dataset, task, _bar_report(bar)) for task in tasks]
        else:
            entries = await _run(_backend(client, run, shards, bar), blob, tasks, out)
        await anyio.to_thread.run_sync(_commit, out, encode_manifest(run, entries, context))
        committed = True
    finally:
        if not committed:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove_run, out, run)
        if bar is not None:
            if committed:
                bar.update(bar.total - bar.n)  # events still in flight
            bar.close()
    return len(all_keys)


async def _run(
    backend: _Backend, blob: bytes, tasks: list[_ShardTask], out: str
) -> list[ShardEntry]:
    """Run the tasks; the first failure cancels the rest and is raised, naming its shard."""
    failed = True
    waiting: list[asyncio.Future[ShardEntry]] = []
    try:
        waiting = await backend.start(blob, tasks)
        index_of = {future: index for index, future in enumerate(waiting)}
        entries: list[ShardEntry | None] = [None] * len(tasks)
        pending: set[asyncio.Future[ShardEntry]] = set(waiting)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for future in done:
                task = tasks[index_of[future]]
                if future.cancelled():
                    raise RuntimeError(
                        f"the shard {task.file} of {out} was cancelled on the cluster; "
                        f"the dataset at {out} was left as it was"
                    )
                exc = future.exception()
                if exc is not None:
                    raise _shard_failure(exc, task, out) from exc
                entries[task.index] = future.result()
        failed = False
    finally:
        with anyio.CancelScope(shield=True):
            await backend.stop(failed)
            for future in waiting:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # seen: the first failure is the one raised
    return [entry for entry in entries if entry is not None]


def _shard_failure(exc: BaseException, task: _ShardTask, out: str) -> BaseException:
    where = f"shard {task.index} ({task.file}, {len(task.keys)} keys) of {out}"
    if isinstance(exc, BrokenProcessPool) or type(exc).__name__ == "KilledWorker":
        return WorkerLostError(
            f"a worker process died while it held {where}: {exc}. The dataset at {out} was "
            f"left as it was; run create again (was a worker out of memory?)"
        )
    exc.add_note(f"while writing {where}; the dataset at {out} was left as it was")
    return exc


async def _key_list(
    dataset: Dataset[Any, Any], keys: Iterable[Any] | AsyncIterable[Any] | None
) -> list[Any]:
    if keys is None:
        return list(await dataset.keys.all())
    if isinstance(keys, AsyncIterable):
        return [key async for key in keys]
    return list(keys)


def _check_unique(keys: list[Any]) -> None:
    """Shards holding the same key could not be read as one dataset: refuse now."""
    seen: set[Any] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"the key {key!r} is given twice: the keys of a dataset are unique")
        seen.add(key)


def _prepare_folder(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(
            17, f"cannot write a sharded dataset to {out}: it is a file, not a folder", out
        )
    os.makedirs(out, exist_ok=True)


def _plan(
    out: str, run: str, keys: list[Any], shards: int, concurrency: int
) -> list[_ShardTask]:
    """Check the keys and the folder, and split the keys into the shards' parts, in order."""
    _check_unique(keys)
    _prepare_folder(out)
    return [
        _ShardTask(
            index, _shard_name(run, index), os.path.join(out, _shard_name(run, index)),
            keys[index * len(keys) // shards:(index + 1) * len(keys) // shards], concurrency,
        )
        for index in range(shards)
    ]


def _commit(out: str, manifest: bytes) -> None:
    """Replace the manifest atomically, then delete every file of ours it does not name."""
    keep = {entry.file for entry in decode_manifest(manifest, MANIFEST).shards}
    sink = AtomicFile(os.path.join(out, MANIFEST))
    try:
        sink.write([manifest])
        sink.commit()
    except BaseException:
        sink.discard()
        raise
    for name in os.listdir(out):
        if name not in keep and _OURS.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out, name))


def _remove_run(out: str, run: str) -> None:
    """Delete what a failed run wrote: its shards and their temporary files."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(out):
            if name.startswith((f"shard-{run}-", f".shard-{run}-")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(out, name))


def _progress_bar(enabled: bool, total: int, name: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="item", desc=os.path.basename(name) or name)


def _bar_report(bar: Any) -> Report | None:
    return None if bar is None else bar.update
