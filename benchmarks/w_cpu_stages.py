"""CPU stages: transforms run by worker processes or threads rather than on the loop.

- a pure-Python transform of about 1 ms per item, 2,000 items, batches of 32:
  ``executor="process", workers=2`` against ``executor=None``, and against
  PyTorch's ``DataLoader(num_workers=2)`` running the same function over the
  same items (skipped where torch is not installed);
- a transform that releases the GIL (a 512x512 float32 FFT per item):
  ``executor="thread", workers=2`` against ``executor=None``;
- the worst lag of the event loop during both;
- how 1 MB arrays travel to worker processes and back: through shared
  memory, against inside the pickle.

Every side runs warm epochs: pools (ours and DataLoader's ``persistent_workers=True``)
start once and are not counted, in rates or lag, and each rate is the best of
``_TIMED`` epochs, so that a hiccup of this shared machine does not decide a row. The
figures are wall-clock rates: the point is to use both cores.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mlworkflow_async import DictDataset, TransformedDataset

from ._table import Row, rate

_BATCH = 32
_TIMED = 3


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def _pure_python(key: int, item: int, n: int) -> int:
    return item + _spin(n)


def _calibrate(target: float = 0.001) -> int:
    """The loop count that makes :func:`_spin` take ``target`` seconds here."""
    n = 20_000
    best = min(_timed(lambda: _spin(n)) for _ in range(5))
    return max(1000, int(n * target / best))


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fft(key: int, item: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.rfft2(item)).astype(np.float32)


async def _heartbeat(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        asked = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - asked - 0.001)


async def _epochs(ds: Any, epochs: int, lags: list[float] | None = None) -> float:
    """Items per second, the best of ``_TIMED`` epochs after ``epochs - 1`` warming ones.

    The lag probe (a task waking every millisecond) runs in an epoch of its
    own, before the timed one: it costs the process CPU that a peer measured
    without it does not pay.
    """
    n = len(ds)
    for _ in range(epochs - 1):  # pools start here, outside what is measured
        async for _ in ds.batches(_BATCH):
            pass
    if lags is not None:
        stop = asyncio.Event()
        beat = asyncio.create_task(_heartbeat(lags, stop))
        async for _ in ds.batches(_BATCH):
            pass
        stop.set()
        await beat
    best = 0.0
    for _ in range(_TIMED):
        start = time.perf_counter()
        async for _ in ds.batches(_BATCH):
            pass
        best = max(best, rate(n, time.perf_counter() - start))
    return best


async def _run_ours(
    items: dict[int, Any], fn: Callable[..., Any], executor: str | None, lags: list[float]
) -> float:
    workers = 2 if executor else None
    ds = TransformedDataset(DictDataset(items), [fn], executor=executor, workers=workers)
    async with ds:
        await ds.keys.all()
        return await _epochs(ds, 2 if executor else 1, lags)


def _torch_rate(items: dict[int, Any], fn: Callable[..., Any]) -> float | None:
    try:
        import torch.utils.data as tud
    except ImportError:
        return None

    class Items(tud.Dataset):  # type: ignore[misc]
        def __init__(self) -> None:
            self.keys = list(items)

        def __len__(self) -> int:
            return len(self.keys)

        def __getitem__(self, index: int) -> Any:
            key = self.keys[index]
            return fn(key, items[key])

    loader = tud.DataLoader(
        Items(), batch_size=_BATCH, num_workers=2, persistent_workers=True
    )
    for _ in loader:  # workers start here
        pass
    best = 0.0
    for _ in range(_TIMED):
        start = time.perf_counter()
        for _ in loader:
            pass
        best = max(best, rate(len(items), time.perf_counter() - start))
    del loader
    return best


def _plain_threads(items: dict[int, Any], fn: Callable[..., Any]) -> float:
    """The same batches from a plain two-thread pool: each batch split in two halves,
    four batches in flight, collated by ``np.array``, no library involved."""
    from concurrent.futures import ThreadPoolExecutor

    keys = list(items)

    def half(part: list[int]) -> list[Any]:
        return [fn(key, items[key]) for key in part]

    def epoch(pool: ThreadPoolExecutor) -> None:
        pending: list[Any] = []
        for start in range(0, len(keys), _BATCH):
            batch = keys[start:start + _BATCH]
            middle = len(batch) // 2
            pending.append((pool.submit(half, batch[:middle]), pool.submit(half, batch[middle:])))
            if len(pending) == 4:
                a, b = pending.pop(0)
                np.array(a.result() + b.result())
        for a, b in pending:
            np.array(a.result() + b.result())

    best = 0.0
    with ThreadPoolExecutor(2) as pool:
        epoch(pool)
        for _ in range(_TIMED):
            start = time.perf_counter()
            epoch(pool)
            best = max(best, rate(len(keys), time.perf_counter() - start))
    return best


async def _array_traffic(quick: bool) -> tuple[float, float]:
    """MB/s of 1 MB arrays sent to worker processes and back: shared memory, then pickled."""
    from mlworkflow_async._core import _executors

    arrays = [(k, np.random.default_rng(k).random((512, 512), np.float32)) for k in range(32)]
    rounds = 3 if quick else 10
    rates = []
    for shm in (True, False):
        saved = _executors._SHM_DIR
        if not shm:
            _executors._SHM_DIR = None
        try:
            pool = _executors.WorkerPool("process", 2)
            await pool.run_batch(_same, arrays)
            start = time.perf_counter()
            for _ in range(rounds):
                await pool.run_batch(_same, arrays)
            seconds = time.perf_counter() - start
            await pool.aclose()
        finally:
            _executors._SHM_DIR = saved
        rates.append(rounds * sum(a.nbytes for _, a in arrays) / 1e6 / seconds)
    return rates[0], rates[1]


def _same(key: int, array: np.ndarray) -> np.ndarray:
    return array


def run(quick: bool) -> list[Row]:
    count = 400 if quick else 2000
    n = _calibrate()
    work = functools.partial(_pure_python, n=n)
    small = {k: k for k in range(count)}
    lag_none: list[float] = []
    lag_process: list[float] = []
    on_loop = asyncio.run(_run_ours(small, work, None, lag_none))
    in_processes = asyncio.run(_run_ours(small, work, "process", lag_process))
    torch_rate = _torch_rate(small, work)

    arrays = {
        k: np.random.default_rng(k).random((512, 512), np.float32)
        for k in range(count // 4)
    }
    lag_thread: list[float] = []
    fft_loop = asyncio.run(_run_ours(arrays, _fft, None, []))
    fft_threads = asyncio.run(_run_ours(arrays, _fft, "thread", lag_thread))
    fft_plain = _plain_threads(arrays, _fft)
    shm, pickled = asyncio.run(_array_traffic(quick))

    rows = [
        Row(
            f"CPU a pure-Python transform, ~1 ms/item, {count} items, process x2",
            "items/s", in_processes, on_loop, "executor=None", 1.7,
        ),
    ]
    if torch_rate is None:
        rows[0].note = "torch row skipped: torch not installed"
    else:
        rows.append(Row(
            "CPU a same, vs torch DataLoader(num_workers=2)", "items/s", in_processes,
            torch_rate, "torch DataLoader, persistent workers", 1.0,
        ))
    rows += [
        Row(
            f"CPU b 512x512 float32 FFT per item, {len(arrays)} items, thread x2",
            "items/s", fft_threads, fft_loop, "executor=None", 1.7,
        ),
        Row(
            "CPU b same, vs a plain ThreadPoolExecutor(2) over the same batches", "items/s",
            fft_threads, fft_plain, "two threads, no library", None,
        ),
        Row(
            "CPU c worst loop lag during CPU a (process) and CPU b (thread)", "ms",
            1e3 * max(lag_process + lag_thread), 20.0, "the 20 ms budget", 1.0,
            higher_is_better=False,
        ),
        Row(
            "CPU c same with executor=None", "ms", 1e3 * max(lag_none), 20.0,
            "the 20 ms budget", None, higher_is_better=False,
        ),
        Row(
            "CPU d 1 MB arrays to worker processes and back", "MB/s", shm, pickled,
            "the same arrays inside the pickle", None, note="shared memory",
        ),
    ]
    return rows
