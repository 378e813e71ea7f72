"""Download many URLs in parallel from a plain script, with the blocking SideRunner.

The same downloader as ``parallel_download.py``, written in sync style: no
``async`` anywhere. A blocking ``SideRunner(10)`` runs ``download_item`` for
each URL, ten at a time, and ``collect_runs()`` waits for them all::

    parallel_downloader = SideRunner(10)
    for url in urls:
        parallel_downloader.run_async(download_item, url)
    parallel_downloader.collect_runs()

Each download is saved in the output directory under the last part of its
URL path, written to a temporary name first and renamed once complete, so
an interrupted run never leaves a truncated file.

    python examples/parallel_download_sync.py --out-dir pages/ URL [URL ...]
    python examples/parallel_download_sync.py --out-dir pages/ --url-list urls.txt --skip-failed
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from mlworkflow_async.sync import SideRunner


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


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1: "1 file", "2 files"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def file_name(url: str) -> str:
    """The name a URL is saved under: the last part of its path."""
    name = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    if name in ("", ".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        return "index"
    return name


class Downloader:
    """Downloads URLs with one shared blocking client, saving each into ``out_dir``."""

    def __init__(self, out_dir: Path, pool_size: int, timeout: float) -> None:
        self.out_dir = out_dir
        limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        self.client = httpx.Client(
            limits=limits, timeout=httpx.Timeout(timeout, pool=None), follow_redirects=True
        )

    def download_item(self, url: str) -> Path:
        """Download ``url`` and save it; runs in a SideRunner worker thread."""
        try:
            response = self.client.get(url)
        except httpx.HTTPError as exc:
            raise DownloadError(url, failure_reason(exc)) from exc
        if response.status_code != 200:
            raise DownloadError(
                url, f"HTTP {response.status_code} {response.reason_phrase}", response.status_code
            )
        target = self.out_dir / file_name(url)
        fd, temp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(response.content)
            os.replace(temp, target)
        except BaseException:
            os.unlink(temp)
            raise
        return target

    def close(self) -> None:
        self.client.close()


def download_all(
    urls: Sequence[str],
    out_dir: Path,
    pool_size: int = 10,
    skip_failed: bool = False,
    timeout: float = 30.0,
) -> tuple[dict[str, Path], dict[str, DownloadError]]:
    """Download ``urls`` into ``out_dir``, ``pool_size`` at a time.

    Returns the saved files and the failures, both by URL. Without
    ``skip_failed``, failures are raised (as an ``ExceptionGroup``) once
    every download has ended; the files saved meanwhile stay.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    downloader = Downloader(out_dir, pool_size, timeout)
    try:
        with SideRunner(pool_size) as parallel_downloader:
            for url in urls:
                parallel_downloader.run_async(downloader.download_item, url)
            results = parallel_downloader.collect_runs(return_exceptions=skip_failed)
    finally:
        downloader.close()
    saved: dict[str, Path] = {}
    failures: dict[str, DownloadError] = {}
    for url, result in zip(urls, results, strict=True):
        if isinstance(result, DownloadError):
            failures[url] = result
        elif isinstance(result, BaseException):
            raise result  # not a download failure: a bug, never to be skipped
        else:
            saved[url] = result
    return saved, failures


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download URLs in parallel into a directory, from a plain script."
    )
    parser.add_argument("urls", nargs="*", metavar="URL", help="URLs to download")
    parser.add_argument(
        "--url-list", type=Path, help="a text file of URLs to download, one per line"
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="where to save the files")
    parser.add_argument(
        "--pool-size", type=int, default=10, help="downloads in flight at most (default 10)"
    )
    parser.add_argument(
        "--skip-failed",
        action="store_true",
        help="list failed URLs at the end instead of failing the run",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per request (default 30)"
    )
    args = parser.parse_args(argv)
    if args.url_list is not None:
        lines = args.url_list.read_text().splitlines()
        args.urls += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    args.urls = list(dict.fromkeys(args.urls))
    if not args.urls:
        parser.error("no URL given: pass URLs or --url-list FILE")
    if args.pool_size < 1:
        parser.error(f"--pool-size must be at least 1, got {args.pool_size}")
    names: dict[str, str] = {}
    for url in args.urls:
        other = names.setdefault(file_name(url), url)
        if other != url:
            parser.error(f"{other} and {url} would both be saved as {file_name(url)!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    urls = _count(len(args.urls), "URL")
    print(f"downloading {urls}, {args.pool_size} at a time, into {args.out_dir}")
    start = time.perf_counter()
    try:
        saved, failures = download_all(
            args.urls, args.out_dir, args.pool_size, args.skip_failed, args.timeout
        )
    except ExceptionGroup as group:
        failed, others = group.split(DownloadError)
        if failed is None or others is not None:
            raise
        for exc in failed.exceptions:
            print(f"error: {exc}", file=sys.stderr)
        print(
            "pass --skip-failed to ignore failed URLs; complete downloads were kept",
            file=sys.stderr,
        )
        return 1
    elapsed = time.perf_counter() - start
    size = sum(path.stat().st_size for path in saved.values())
    files, size_text = _count(len(saved), "file"), _count(size, "byte")
    print(f"saved {files} ({size_text}) in {args.out_dir} in {elapsed:.2f} s")
    if failures:
        print(f"skipped {_count(len(failures), 'failed URL')}:")
        for failure in failures.values():
            print(f"  {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
