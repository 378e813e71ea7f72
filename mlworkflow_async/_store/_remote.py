"""Files behind URLs as byte sources: ``http(s)://`` and any fsspec URL.

:func:`open_source` opens a URL and returns a :class:`RemoteSource`, which
has the byte-source interface every PickledDataset reader reads through:
``name``, ``size`` and ``await read_ranges([(offset, length), ...])``.

- Opening costs one request: the last bytes of the file (64 KiB by default,
  where a file keeps its footer and, for most files, its index), which also
  tell its size and ETag. Reads inside those bytes cost nothing more.
- A call to ``read_ranges`` (one batch) groups its ranges into requests:
  ranges less than ``gap`` bytes apart travel in one request. All the
  requests of a call run at once, bounded per host (``max_requests``, shared
  by every file of that host in the event loop).
- Transient failures (connection resets, timeouts, HTTP 5xx, 429) are
  retried with exponential backoff and jitter (``tenacity``), up to
  ``retries`` more times; the final failure is a
  :class:`~mlworkflow_async.exceptions.RemoteFileError` naming the URL and
  the byte range (its ``ranges`` attribute lists the ranges it failed).
- With ``cache_dir``, fetched blocks are kept on local disk and shared by
  every process using the same folder (see :mod:`._range_cache`).

>>> import asyncio, fsspec
>>> fsspec.filesystem("memory").pipe_file("/doc/letters.bin", b"abcdefghij")
>>> async def main():
...     source = await open_source("memory://doc/letters.bin")
...     return source.size, [bytes(b) for b in await source.read_ranges([(0, 3), (7, 3)])]
>>> asyncio.run(main())
(10, [b'abc', b'hij'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import anyio
import anyio.to_thread

from .._core._loop_local import LoopLocal
from ..exceptions import RemoteFileError
from ._transport import Transient, Transport

__all__ = ["RemoteOptions", "RemoteSource", "is_url", "open_source"]


def is_url(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a URL (``scheme://...``) rather than a local path.

    >>> is_url("https://example.com/d.pkl"), is_url("s3://bucket/d.pkl"), is_url("d.pkl")
    (True, True, False)
    """
    if not isinstance(name, str):
        return False
    scheme, sep, _ = name.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


@dataclass(frozen=True)
class RemoteOptions:
    """How a remote file is read; every field is a keyword of :func:`open_source`."""

    #: Ranges at most this many bytes apart are fetched in one request.
    gap: int = 64 << 10
    #: Requests in flight at once to one host, per event loop.
    max_requests: int = 16
    #: Further attempts after a transient failure.
    retries: int = 5
    #: The first backoff, in seconds; it doubles after each failure, with jitter.
    backoff: float = 0.05
    #: The longest backoff, in seconds.
    max_backoff: float = 5.0
    #: Seconds to connect, or to wait for the next bytes of an answer.
    timeout: float = 30.0
    #: Bytes fetched from the end of the file when it is opened.
    tail: int = 64 << 10
    #: A folder to keep fetched blocks in, or None.
    cache_dir: str | None = None
    #: The bound of ``cache_dir``, in bytes.
    cache_size: int | None = None
    #: The cache's block size, in bytes (a multiple of 4096).
    cache_block: int | None = None
    #: Extra HTTP headers (authorization, say) for ``http(s)://`` URLs.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Options of the fsspec filesystem, for other URLs.
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("gap", "retries", "tail"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {self.max_requests}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")


class Stats:
    """What a source has asked of its server, for tests and benchmarks."""

    __slots__ = ("bytes_fetched", "bytes_needed", "requests", "retries")

    def __init__(self) -> None:
        self.requests = 0
        self.retries = 0
        self.bytes_fetched = 0
        self.bytes_needed = 0

    def __repr__(self) -> str:
        return (f"Stats(requests={self.requests}, retries={self.retries}, "
                f"bytes_fetched={self.bytes_fetched}, bytes_needed={self.bytes_needed})")


# Semaphores per event loop and host: requests of every file of a host share one bound.
_limits: LoopLocal[dict[tuple[str, int], anyio.Semaphore]] = LoopLocal(dict)


def _host_limit(host: str, limit: int) -> anyio.Semaphore:
    by_host = _limits.get()
    semaphore = by_host.get((host, limit))
    if semaphore is None:
        semaphore = by_host[host, limit] = anyio.Semaphore(limit)
    return semaphore


def _transport(url: str, options: RemoteOptions) -> Transport:
    scheme = url.partition("://")[0].lower()
    try:
        if scheme in ("http", "https"):
            from ._http import HttpTransport

            return HttpTransport(url, timeout=options.timeout, headers=options.headers)
        from ._fsspec import FsspecTransport

        return FsspecTransport(url, options.storage_options)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"reading {url} needs the 'remote' extra: pip install 'mlworkflow-async[remote]' "
            f"({exc.name} is missing)",
            name=exc.name,
        ) from exc


async def open_source(url: str, **options: Any) -> RemoteSource:
    """Open ``url``: one request (two for an fsspec URL, which looks the file up first).

    ``options`` are the fields of :class:`RemoteOptions`. Raises
    :class:`~mlworkflow_async.exceptions.RemoteFileNotFoundError` for a
    missing file and :class:`~mlworkflow_async.exceptions.RemoteFileError`
    for a server that cannot be reached or does not serve byte ranges.
    """
    opts = RemoteOptions(**options)
    transport = _transport(url, opts)
    source = RemoteSource(transport, opts)
    try:
        await source._open()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await source.aclose()
        raise
    return source


class RemoteSource:
    """A file behind a URL, read by byte ranges; made by :func:`open_source`."""

    def __init__(self, transport: Transport, options: RemoteOptions) -> None:
        self._transport = transport
        self.options = options
        self.name = transport.url
        self.size = 0
        self.validator = ""
        self.stats = Stats()
        self.cache: Any = None  # a RangeCache, once open
        self._tail_start = 0
        self._tail = memoryview(b"")

    async def _open(self) -> None:
        opened = await self._retrying(self._transport.open, self.options.tail, what="opening")
        self.size, self.validator = opened.size, opened.validator
        self._tail_start, self._tail = opened.tail_start, memoryview(opened.tail)
        self.stats.bytes_fetched += len(opened.tail)
        if self.options.cache_dir is not None:
            from ._range_cache import DEFAULT_BLOCK, DEFAULT_LIMIT, RangeCache

            opts = self.options
            self.cache = await anyio.to_thread.run_sync(
                lambda: RangeCache(
                    str(opts.cache_dir), self.name, self.validator, self.size,
                    block=opts.cache_block or DEFAULT_BLOCK,
                    limit=DEFAULT_LIMIT if opts.cache_size is None else opts.cache_size,
                )
            )

    # -- reads ---------------------------------------------------------------

    def peek(self, offset: int, length: int) -> bytes | None:
        """The bytes of a range among those fetched when opening, else None (no request)."""
        start = offset - self._tail_start
        if start < 0 or offset + length > self.size or length < 0:
            return None
        return bytes(self._tail[start:start + length])

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """The bytes of each ``(offset, length)`` pair, in order.

        Ranges in the last bytes fetched at opening, or in the cache, cost
        no request; the others are grouped and fetched at once.
        """
        out: list[memoryview | None] = [None] * len(ranges)
        todo: list[int] = []
        tail_start, tail, size = self._tail_start, self._tail, self.size
        for i, (offset, length) in enumerate(ranges):
            if offset < 0 or length < 0 or offset + length > size:
                raise RemoteFileError(
                    f"bytes {offset}-{offset + length - 1} lie outside {self.name} "
                    f"({size} bytes)", self.name
                )
            if offset >= tail_start:
                out[i] = tail[offset - tail_start:offset - tail_start + length]
            elif length == 0:
                out[i] = memoryview(b"")
            else:
                todo.append(i)
        if todo:
            self.stats.bytes_needed += sum(ranges[i][1] for i in todo)
            cache = self.cache
            if cache is not None:
                todo = await self._from_cache(ranges, todo, out)
            if todo:
                await self._fetch(ranges, todo, out)
        return out  # type: ignore[return-value]

    async def _from_cache(
        self, ranges: Sequence[tuple[int, int]], todo: list[int], out: list[memoryview | None]
    ) -> list[int]:
        """Fill ``out`` from the cache; return the indices it did not have."""
        wanted = [ranges[i] for i in todo]
        # Cached blocks in the page cache are read right here: no thread hop.
        found = self.cache.read_nowait(wanted)
        if found is None:
            found = await anyio.to_thread.run_sync(self.cache.read, wanted)
        missing = []
        for i, data in zip(todo, found, strict=True):
            if data is None:
                missing.append(i)
            else:
                out[i] = memoryview(data)
        return missing

    def _plan(
        self, ranges: Sequence[tuple[int, int]], todo: list[int]
    ) -> list[tuple[int, int, list[int]]]:
        """Group the ranges of ``todo`` into requests ``(start, stop, indices)``."""
        cache = self.cache
        block = cache.block if cache is not None else 0
        spans = []
        for i in todo:
            offset, length = ranges[i]
            start, stop = offset, offset + length
            if block:  # the cache stores whole blocks
                start -= start % block
                stop = min(self.size, stop + -stop % block)
            spans.append((start, stop, i))
        spans.sort()
        gap = self.options.gap
        requests: list[tuple[int, int, list[int]]] = []
        for start, stop, i in spans:
            if requests and start - requests[-1][1] <= gap:
                last = requests[-1]
                last[2].append(i)
                if stop > last[1]:
                    requests[-1] = (last[0], stop, last[2])
            else:
                requests.append((start, stop, [i]))
        return requests

    async def _fetch(
        self, ranges: Sequence[tuple[int, int]], todo: list[int], out: list[memoryview | None]
    ) -> None:
        requests = self._plan(ranges, todo)
        limit = _host_limit(self._transport.host, self.options.max_requests)
        fetched: list[tuple[int, bytes]] = []
        failure: list[BaseException] = []

        async def one(start: int, stop: int, members: list[int]) -> None:
            try:
                data = await self._retrying(
                    self._transport.fetch, start, stop, limit=limit,
                    what=f"reading bytes {start}-{stop - 1}",
                )
            except Exception as exc:
                if isinstance(exc, RemoteFileError):
                    exc.ranges = [ranges[i] for i in members]  # type: ignore[attr-defined]
                failure.append(exc)
                scope.cancel()
                return
            self.stats.bytes_fetched += len(data)
            view = memoryview(data)
            for i in members:
                offset, length = ranges[i]
                out[i] = view[offset - start:offset - start + length]
            fetched.append((start, data))

        if len(requests) == 1:
            with anyio.CancelScope() as scope:
                await one(*requests[0])
        else:
            async with anyio.create_task_group() as group:
                scope = group.cancel_scope
                for request in requests:
                    group.start_soon(one, *request)
        if failure:
            raise failure[0]
        if self.cache is not None and fetched:
            await anyio.to_thread.run_sync(self._store, fetched)

    def _store(self, fetched: list[tuple[int, bytes]]) -> None:
        for start, data in fetched:
            self.cache.write(start, data)

    async def _retrying(
        self, call: Any, *args: Any, what: str, limit: anyio.Semaphore | None = None
    ) -> Any:
        """``await call(*args)``, trying again after transient failures."""
        import tenacity

        opts = self.options
        attempts = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(opts.retries + 1),
            # "Full jitter": a random wait up to a bound that doubles each time.
            wait=tenacity.wait_random_exponential(multiplier=opts.backoff, max=opts.max_backoff),
            retry=tenacity.retry_if_exception_type(Transient),
            sleep=anyio.sleep,
            reraise=True,
        )
        tries = 0
        try:
            async for attempt in attempts:
                with attempt:
                    tries += 1
                    if tries > 1:
                        self.stats.retries += 1
                    self.stats.requests += 1
                    if limit is None:
                        return await call(*args)
                    async with limit:
                        return await call(*args)
        except Transient as exc:
            plural = "attempt" if tries == 1 else "attempts"
            raise RemoteFileError(
                f"{what} of {self.name} failed after {tries} {plural}: {exc}", self.name
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- mapping (with a cache) ------------------------------------------------

    async def map_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Read-only views of the cache file's bytes of each range, fetched first if needed.

        Only with ``cache_dir``: the views map the cached bytes, no copy.
        """
        cache = self.cache
        if cache is None:
            raise ValueError(f"mapping bytes of {self.name} needs a cache_dir")
        missing = [i for i, (offset, length) in enumerate(ranges) if not cache.has(offset, length)]
        if missing:
            out: list[memoryview | None] = [None] * len(ranges)
            await self._fetch(ranges, missing, out)
        still = [ranges[i] for i in missing if not cache.has(*ranges[i])]
        if still:  # the cache is full: copies, then
            return await self.read_ranges(ranges)
        view = await anyio.to_thread.run_sync(cache.view)
        return [view[offset:offset + length] for offset, length in ranges]

    # -- life cycle ------------------------------------------------------------

    async def aclose(self) -> None:
        await self._transport.aclose()
        self.close()

    def close(self) -> None:
        self._transport.close()
        cache, self.cache = self.cache, None
        if cache is not None:
            cache.close()

    def __repr__(self) -> str:
        return f"<RemoteSource {self.name!r}: {self.size} bytes>"
