"""Download many URLs concurrently into one PickledDataset file.

The dataset's keys are URLs and ``query_item`` downloads one with a shared
``httpx.AsyncClient``. ``PickledDataset.create`` pulls the items with a
bounded number of downloads in flight and writes the file atomically, so a
failed run leaves no half-written file behind.

    python examples/parallel_download.py --out pages.pickle URL [URL ...]
    python examples/parallel_download.py --out pages.pickle --url-list urls.txt \\
        --concurrency 16 --skip-failed

Each stored item is the body of the response, as bytes, under its URL. A URL
that fails (an HTTP error status, a refused connection, a timeout) stops the
run with an error naming it; with ``--skip-failed`` it is left out and
listed at the end instead, and the other downloads go on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import httpx

from mlworkflow_async import Dataset, FilteredDataset, PickledDataset


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


class Downloads(Dataset[str, bytes | None]):
    """The body of each URL, fetched with ``client``.

    With ``skip_failed``, a failed download is recorded in :attr:`failures`
    and its item is ``None`` (for a filter to drop) instead of raising.
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

    async def query_item(self, key: str) -> bytes | None:
        try:
            data = await self._get(key)
        except DownloadError as exc:
            if not self.skip_failed:
                raise
            self.failures[key] = exc
            return None
        self.downloaded_bytes += len(data)
        return data

    async def _get(self, url: str) -> bytes:
        try:
            response = await self.client.get(url)
        except httpx.HTTPError as exc:
            raise DownloadError(url, failure_reason(exc)) from exc
        if response.status_code != 200:
            raise DownloadError(
                url, f"HTTP {response.status_code} {response.reason_phrase}", response.status_code
            )
        return response.content


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


class Report(NamedTuple):
    stored: int  # items written to the file
    downloaded_bytes: int
    failures: dict[str, DownloadError]  # by URL, in --skip-failed mode


async def download(
    urls: Sequence[str],
    out: Path,
    concurrency: int = 10,
    skip_failed: bool = False,
    request_timeout: float = 30.0,
    progress: bool = True,
) -> Report:
    """Download ``urls`` into the PickledDataset file ``out``, at most ``concurrency`` at once."""
    # Connections are capped at the same bound as the downloads: a filter
    # looking ahead for keys cannot open more of them either.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(request_timeout, pool=None), follow_redirects=True
    ) as client:
        downloads = Downloads(urls, client, skip_failed)
        source: Dataset[str, bytes | None] = downloads
        if skip_failed:
            source = FilteredDataset(downloads, lambda url, data: data is not None)
        stored = await PickledDataset.create(
            source, out, concurrency=concurrency, progress=progress
        )
    return Report(stored, downloads.downloaded_bytes, downloads.failures)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download URLs concurrently into a PickledDataset file (keys: the URLs)."
    )
    parser.add_argument("urls", nargs="*", metavar="URL", help="URLs to download")
    parser.add_argument(
        "--url-list", type=Path, help="a text file of URLs to download, one per line"
    )
    parser.add_argument("--out", type=Path, required=True, help="the PickledDataset file to write")
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
    if not args.urls:
        parser.error("no URL given: pass URLs or --url-list FILE")
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    count = len(dict.fromkeys(args.urls))
    print(f"downloading {count} URLs, at most {args.concurrency} at a time, into {args.out}")
    start = time.perf_counter()
    try:
        report = asyncio.run(
            download(
                args.urls,
                args.out,
                args.concurrency,
                args.skip_failed,
                args.timeout,
                progress=not args.no_progress,
            )
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(
            f"nothing was written to {args.out}; pass --skip-failed to store the other URLs",
            file=sys.stderr,
        )
        return 1
    elapsed = time.perf_counter() - start
    print(
        f"stored {report.stored} downloads ({_size(report.downloaded_bytes)}) "
        f"in {args.out} in {elapsed:.2f} s"
    )
    if report.failures:
        print(f"skipped {len(report.failures)} failed URLs:")
        for failure in report.failures.values():
            print(f"  {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
