"""Download many URLs concurrently: into one PickledDataset file, or a file each.

The dataset's keys are URLs and ``query_item`` downloads one with a shared
``httpx.AsyncClient``. With ``--out``, ``PickledDataset.create`` pulls the
items with a bounded number of downloads in flight and writes the file
atomically, so a failed run leaves no half-written file behind.

With ``--out-dir``, each download is streamed into its own file in that
folder instead, named after the last part of its URL path, with at most
``--concurrency`` downloads in flight (``batches()`` drives them). The files
are written with ``aiofiles``, so the event loop never waits for the disk,
and atomically: each goes to a temporary ``.NAME.*.part`` in the same
folder and is renamed to ``NAME`` once complete. A failed or interrupted
download removes its temporary file, so no file is ever half-written under
its final name (a killed process may leave a ``.part`` behind, never a
partial ``NAME``); downloads completed before a failure are kept.

    python examples/parallel_download.py --out pages.pickle URL [URL ...]
    python examples/parallel_download.py --out pages.pickle --url-list urls.txt \\
        --concurrency 16 --skip-failed
    python examples/parallel_download.py --out-dir pages/ --url-list urls.txt

With ``--out`` each stored item is the body of the response, as bytes,
under its URL. A URL that fails (an HTTP error status, a refused
connection, a timeout, a connection lost mid-body) stops the run with an
error naming it; with ``--skip-failed`` it is left out and listed at the
end instead, and the other downloads go on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from abc import abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

import aiofiles
import aiofiles.os
import httpx

from mlworkflow_async import Dataset, FilteredDataset, PickledDataset

T = TypeVar("T")

#: Bytes handed to each file write: one worker-thread hop per MiB, not per network read.
WRITE_CHUNK = 1 << 20


class DownloadError(Exception):
    """One URL could not be downloaded; the message names it and says why."""

    def __init__(self, url: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"GET {url} failed: {reason}")
        self.url = url
        self.reason = reason
        self.status = status


def failure_reason(exc: httpx.HTTPError) -> str:
    """``exc`` in a few words: the underlying OS error (e.g. a refused connection) if any."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return f"{type(exc).__name__}: {os.strerror(cause.errno)}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc or 'no response'}"


@asynccontextmanager
async def ok_response(client: httpx.AsyncClient, url: str) -> AsyncIterator[httpx.Response]:
    """The streamed response to ``GET url``, checked to be a 200.

    Any failure, while connecting or while the body is read in the block,
    raises :class:`DownloadError` naming ``url``.
    """
    try:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise DownloadError(
                    url,
                    f"HTTP {response.status_code} {response.reason_phrase}",
                    response.status_code,
                )
            yield response
    except httpx.HTTPError as exc:
        raise DownloadError(url, failure_reason(exc)) from exc


class _Fetches(Dataset[str, T | None], Generic[T]):
    """Fetches each URL with ``client``; subclasses say what an item is.

    With ``skip_failed``, a failed download is recorded in :attr:`failures`
    and its item is ``None`` instead of raising.
    """

    def __init__(
        self, urls: Sequence[str], client: httpx.AsyncClient, skip_failed: bool = False
    ) -> None:
        self.urls = tuple(dict.fromkeys(urls))  # a URL listed twice is fetched once
        self.client = client
        self.skip_failed = skip_failed
        self.failures: dict[str, DownloadError] = {}
        self.downloaded_bytes = 0

    def yield_keys(self) -> tuple[str, ...]:
        return self.urls

    async def query_item(self, key: str) -> T | None:
        try:
            return await self.fetch(key)
        except DownloadError as exc:
            if not self.skip_failed:
                raise
            self.failures[key] = exc
            return None

    def failures_in_order(self) -> dict[str, DownloadError]:
        """:attr:`failures` in the order of the URLs, rather than of their failing."""
        return {url: self.failures[url] for url in self.urls if url in self.failures}

    @abstractmethod
    async def fetch(self, url: str) -> T:
        """Download ``url``; raise :class:`DownloadError` if that fails."""


class Downloads(_Fetches[bytes]):
    """The body of each URL, in memory (``None`` for a skipped failure)."""

    async def fetch(self, url: str) -> bytes:
        async with ok_response(self.client, url) as response:
            data = await response.aread()
        self.downloaded_bytes += len(data)
        return data


class SavedDownloads(_Fetches[Path]):
    """Each URL saved as its own file in ``out_dir``; the item is the file's path."""

    def __init__(
        self,
        urls: Sequence[str],
        client: httpx.AsyncClient,
        out_dir: Path,
        skip_failed: bool = False,
    ) -> None:
        super().__init__(urls, client, skip_failed)
        self.out_dir = out_dir

    async def fetch(self, url: str) -> Path:
        target = self.out_dir / file_name(url)
        async with ok_response(self.client, url) as response:
            # Inside the block: a connection lost mid-body is a DownloadError,
            # and the partial file is gone by then.
            size = await save_atomically(response.aiter_bytes(WRITE_CHUNK), target)
        self.downloaded_bytes += size
        return target


async def save_atomically(chunks: AsyncIterable[bytes], target: Path) -> int:
    """Write ``chunks`` into the file ``target``, atomically; return its size.

    The bytes go to a new temporary file beside ``target`` through
    ``aiofiles`` (worker threads: the loop never blocks), which is renamed
    to ``target`` once complete; an existing ``target`` is replaced only
    then. On any error or cancellation the temporary file is removed.
    """
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    size = 0
    try:
        async with aiofiles.open(temp, "xb") as file:
            async for chunk in chunks:
                size += await file.write(chunk)
        await aiofiles.os.replace(temp, target)
    except BaseException:
        # Shielded, so that a download cancelled again meanwhile still
        # removes its file.
        await asyncio.shield(_remove(temp))
        raise
    return size


async def _remove(path: Path) -> None:
    with suppress(FileNotFoundError):
        await aiofiles.os.remove(path)


def file_name(url: str) -> str:
    """The name a URL is saved under: the last part of its path."""
    name = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    if name in ("", ".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        return "index"
    return name


def clashing_names(urls: Sequence[str]) -> str | None:
    """Why ``urls`` cannot be saved side by side in one folder, or None if they can."""
    seen: dict[str, str] = {}
    for url in dict.fromkeys(urls):
        other = seen.setdefault(file_name(url), url)
        if other != url:
            return f"{other} and {url} would both be saved as {file_name(url)!r}"
    return None


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1: "1 URL", "2 URLs"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _size(n: int) -> str:
    if n < 1000:
        return _count(n, "byte")
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


class Report(NamedTuple):
    stored: int  # items written to the file, or files saved
    downloaded_bytes: int
    failures: dict[str, DownloadError]  # by URL, in URL order, in --skip-failed mode


def _client(concurrency: int, request_timeout: float) -> httpx.AsyncClient:
    # Connections are capped at the same bound as the downloads: a filter
    # looking ahead for keys cannot open more of them either.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(request_timeout, pool=None), follow_redirects=True
    )


async def download(
    urls: Sequence[str],
    out: Path,
    concurrency: int = 10,
    skip_failed: bool = False,
    request_timeout: float = 30.0,
    progress: bool = True,
) -> Report:
    """Download ``urls`` into the PickledDataset file ``out``, at most ``concurrency`` at once."""
    async with _client(concurrency, request_timeout) as client:
        downloads = Downloads(urls, client, skip_failed)
        source: Dataset[str, bytes | None] = downloads
        if skip_failed:
            source = FilteredDataset(downloads, lambda url, data: data is not None)
        stored = await PickledDataset.create(
            source, out, concurrency=concurrency, progress=progress
        )
    return Report(stored, downloads.downloaded_bytes, downloads.failures_in_order())


async def download_files(
    urls: Sequence[str],
    out_dir: Path,
    concurrency: int = 10,
    skip_failed: bool = False,
    request_timeout: float = 30.0,
    progress: bool = True,
) -> Report:
    """Download each of ``urls`` into its own file in ``out_dir``, at most ``concurrency`` at once.

    Without ``skip_failed``, the first failure stops the run: the downloads
    in flight are cancelled (their temporary files removed) and the
    :class:`DownloadError` is raised; files completed before it stay.
    """
    clash = clashing_names(urls)
    if clash is not None:
        raise ValueError(f"{clash} in {out_dir}")
    await aiofiles.os.makedirs(out_dir, exist_ok=True)
    async with _client(concurrency, request_timeout) as client:
        saved = SavedDownloads(urls, client, out_dir, skip_failed)
        bar = _progress_bar(progress, len(saved.urls), str(out_dir))
        stored = 0
        try:
            # One item a batch: each file counts as soon as it is saved. Any
            # exit from the block cancels the downloads still in flight.
            async with saved.batches(1, collate_fn=list, concurrency=concurrency) as stream:
                async for _, paths in stream:
                    stored += sum(path is not None for path in paths)
                    if bar is not None:
                        bar.update(len(paths))
        finally:
            if bar is not None:
                bar.close()
    return Report(stored, saved.downloaded_bytes, saved.failures_in_order())


def _progress_bar(enabled: bool, total: int, name: str) -> Any:
    """A ``tqdm`` bar if asked for and installed (as ``PickledDataset.create`` shows)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="file", desc=name)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download URLs concurrently into a PickledDataset file (keys: the URLs) "
        "or into a folder, a file each."
    )
    parser.add_argument("urls", nargs="*", metavar="URL", help="URLs to download")
    parser.add_argument(
        "--url-list", type=Path, help="a text file of URLs to download, one per line"
    )
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="the PickledDataset file to write")
    out.add_argument(
        "--out-dir", type=Path,
        help="a folder to save each download in, under the last part of its URL path",
    )
    parser.add_argument(
        "--concurrency", type=int, default=10, help="downloads in flight at most (default 10)"
    )
    parser.add_argument(
        "--skip-failed",
        action="store_true",
        help="leave failed URLs out and list them at the end, instead of stopping",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per request (default 30)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.url_list is not None:
        lines = args.url_list.read_text().splitlines()
        args.urls += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    args.urls = list(dict.fromkeys(args.urls))
    if not args.urls:
        parser.error("no URL given: pass URLs or --url-list FILE")
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.out_dir is not None:
        clash = clashing_names(args.urls)
        if clash is not None:
            parser.error(f"{clash} in {args.out_dir}; pass --out to store them by URL")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    target = args.out if args.out is not None else args.out_dir
    print(
        f"downloading {_count(len(args.urls), 'URL')}, "
        f"at most {args.concurrency} at a time, into {target}"
    )
    options = (args.concurrency, args.skip_failed, args.timeout, not args.no_progress)
    start = time.perf_counter()
    try:
        if args.out is not None:
            report = asyncio.run(download(args.urls, args.out, *options))
        else:
            report = asyncio.run(download_files(args.urls, args.out_dir, *options))
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"{_kept(args)}; pass --skip-failed to store the other URLs", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {_kept(args)}", file=sys.stderr)
        return 130
    except OSError as exc:  # the output cannot be written: a full disk, a read-only folder
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    verb, what = ("stored", "download") if args.out is not None else ("saved", "file")
    print(
        f"{verb} {_count(report.stored, what)} ({_size(report.downloaded_bytes)}) "
        f"in {target} in {elapsed:.2f} s"
    )
    if report.failures:
        print(f"skipped {_count(len(report.failures), 'failed URL')}:")
        for failure in report.failures.values():
            print(f"  {failure}")
    return 0


def _kept(args: argparse.Namespace) -> str:
    """What a stopped run left behind."""
    if args.out is not None:
        return f"nothing was written to {args.out}"
    return f"the downloads completed meanwhile are in {args.out_dir}, none half-written"


if __name__ == "__main__":
    sys.exit(main())
