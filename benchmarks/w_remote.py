"""WR: a PickledDataset read over HTTP from a loopback server adding 2 ms per request.

The server (uvicorn + Starlette, answering byte ranges from memory) runs in
its own process. The workload is a shuffled epoch of ``batches(64)`` over
20,000 small items (W3a's). Figures are wall-clock rates: the work waits on
the network, and the server's CPU is not ours.

- against one blocking request per item (a map-style loader reading each
  item with its own range request, on one keep-alive connection); also
  against 16 threads doing the same (information);
- against downloading the whole file first, then reading it locally: the
  note gives the crossover, the number of items past which downloading
  first wins;
- a second epoch with ``cache_dir``, against the same epoch on a local file;
- requests per batch, and bytes transferred per byte needed (information).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import os
import random
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from typing import Any

from mlworkflow_async import DictDataset, PickledDataset

from ._data import small_items
from ._table import Row, Timer, rate

LATENCY = 0.002


def _serve(folder: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests._range_server", folder, "--latency", str(LATENCY),
         "--in-memory"],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


async def _epoch(ds: PickledDataset, order: list[int]) -> float:
    count = 0
    with Timer() as t:
        async for keys, _ in ds.batches(64, order, collate_fn=list):
            count += len(keys)
    assert count == len(order)
    return t.seconds


def _per_item(url: str, entries: dict[Any, Any], keys: list[int]) -> float:
    """Seconds to fetch ``keys`` one blocking range request each, then unpickle."""
    import pickle

    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port)
    with Timer() as t:
        for key in keys:
            offset, span, plen, buffers = entries[key]
            connection.request("GET", parts.path,
                               headers={"Range": f"bytes={offset}-{offset + span - 1}"})
            response = connection.getresponse()
            data = memoryview(response.read())
            assert response.status == 206
            pickle.loads(data[:plen], buffers=[data[a:b] for a, b in buffers or ()])
    connection.close()
    return t.seconds


def _per_item_threads(url: str, entries: dict[Any, Any], keys: list[int], threads: int) -> float:
    local = threading.local()

    def fetch(key: int) -> None:
        _per_item_one(url, entries, key, local)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool, Timer() as t:
        list(pool.map(fetch, keys))
    return t.seconds


def _per_item_one(url: str, entries: dict[Any, Any], key: int, local: Any) -> None:
    import pickle

    parts = urllib.parse.urlsplit(url)
    if not hasattr(local, "connection"):
        local.connection = http.client.HTTPConnection(parts.hostname, parts.port)
    offset, span, plen, buffers = entries[key]
    local.connection.request("GET", parts.path,
                             headers={"Range": f"bytes={offset}-{offset + span - 1}"})
    response = local.connection.getresponse()
    data = memoryview(response.read())
    pickle.loads(data[:plen], buffers=[data[a:b] for a, b in buffers or ()])


def _download(url: str, folder: str) -> tuple[float, str]:
    """Seconds to download the whole file to ``folder`` (one request)."""
    parts = urllib.parse.urlsplit(url)
    path = os.path.join(folder, "downloaded.pkl")
    with Timer() as t:
        connection = http.client.HTTPConnection(parts.hostname, parts.port)
        connection.request("GET", parts.path, headers={"Range": "bytes=0-"})
        response = connection.getresponse()
        assert response.status == 206, response.status
        with open(path, "wb") as file:
            while chunk := response.read(1 << 20):
                file.write(chunk)
        connection.close()
    return t.seconds, path


def run(quick: bool) -> list[Row]:
    n = 5000 if quick else 20000
    sample = 300 if quick else 1000  # items the slow baselines fetch (rates, not totals)
    folder = tempfile.mkdtemp(prefix="bench-remote-")
    local_path = os.path.join(folder, "small.pkl")
    asyncio.run(PickledDataset.create(DictDataset(small_items(n)), local_path))
    order = list(range(n))
    random.Random(0).shuffle(order)
    server, base = _serve(folder)
    url = f"{base}/small.pkl"
    try:
        return asyncio.run(_measure(url, local_path, folder, order, sample))
    finally:
        server.terminate()
        server.wait(10)


async def _measure(
    url: str, local_path: str, folder: str, order: list[int], sample: int
) -> list[Row]:
    n = len(order)
    batches = -(-n // 64)
    async with await PickledDataset.open(url) as ds:
        stats: Any = ds._reader.source.stats  # type: ignore[union-attr]
        opening = stats.requests
        size = ds._reader.size
        ours = await _epoch(ds, order)
        requests = stats.requests - opening
        fetched, needed = stats.bytes_fetched, stats.bytes_needed
    with PickledDataset(local_path) as local:
        entries = local._reader.entries  # type: ignore[union-attr]
        local_epoch = await _epoch(local, order)
        local_epoch = min(local_epoch, await _epoch(local, order))
    per_item = await asyncio.to_thread(_per_item, url, entries, order[:sample])
    threaded = await asyncio.to_thread(_per_item_threads, url, entries, order[:sample * 4], 16)
    download, copy = await asyncio.to_thread(_download, url, folder)
    with Timer() as t:
        async with await PickledDataset.open(copy) as downloaded:
            await _epoch(downloaded, order)
    download_epoch = download + t.seconds
    cache = os.path.join(folder, "cache")
    async with await PickledDataset.open(url, cache_dir=cache) as cached:
        await _epoch(cached, order)  # fills the cache
        second = await _epoch(cached, order)
    ours_rate = rate(n, ours)
    # Downloading first wins past the item count where its fixed cost is repaid.
    per_ours, per_local = ours / n, local_epoch / n
    crossover = download / (per_ours - per_local) if per_ours > per_local else float("inf")
    return [
        Row(f"WR0 requests to open a {size >> 10:,} KiB file",
            "requests", opening, 2.0, "the limit (last bytes, then the index)", 1.0,
            higher_is_better=False),
        Row("WR1 shuffled epoch over HTTP, 2 ms/request", "items/s", ours_rate,
            rate(sample, per_item), "one blocking request per item", 10.0),
        Row("WR1b same", "items/s", ours_rate, rate(sample * 4, threaded),
            "16 threads, one request per item", None),
        Row("WR2 same, against downloading first", "items/s", ours_rate,
            rate(n, download_epoch), "download, then read locally", None,
            note=f"crossover at {crossover:,.0f} items ({crossover / n:.0%} of an epoch)"),
        Row("WR3 second epoch with cache_dir", "items/s", rate(n, second),
            rate(n, local_epoch), "local file", 0.5),
        Row("WR4 requests per batch", "requests", requests / batches, 64.0,
            "one per item", None, higher_is_better=False),
        Row("WR5 bytes transferred per byte needed", "x", fetched / needed, 1.0,
            "bytes needed", None, higher_is_better=False),
    ]
