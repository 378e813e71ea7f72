"""Byte ranges of a file served over HTTP(S), with ``aiohttp``.

Every read is one ``GET`` with a ``Range: bytes=a-b`` header. The file is
pinned when opened: its ETag (sent back as ``If-Match`` when it is a strong
one) and its size (the total of each ``Content-Range``) must stay the same,
or the read fails with :class:`~mlworkflow_async.exceptions.RemoteFileChangedError`.

aiohttp rather than httpx: on loopback, with 16 range requests in flight,
httpx spent about 8 times the CPU per request (see the README).

Sessions are bound to an event loop, so each transport keeps one
``aiohttp.ClientSession`` per loop it is used from (the caller's loop, the
blocking view's loop...). Connections are kept alive between requests.
Under trio, requests are made on the blocking view's asyncio loop, through a
worker thread.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import anyio.to_thread

from ..exceptions import RemoteFileChangedError, RemoteFileError, RemoteFileNotFoundError
from ._transport import Opened, Transient

__all__ = ["HttpTransport"]

T = TypeVar("T")

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)
_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)", re.ASCII)
#: Answers worth asking again: the server or something in between is overloaded.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Failures worth trying again: resets, dropped connections, cut answers, timeouts.
_TRANSIENT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


class HttpTransport:
    """Range requests to one URL; see the module docstring."""

    def __init__(
        self, url: str, *, timeout: float, headers: Mapping[str, str] | None = None
    ) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.host = f"{parts.scheme}://{parts.netloc}"
        self._timeout = aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)
        # Compressed answers would not be the bytes asked for.
        self._headers = {"Accept-Encoding": "identity", **dict(headers or {})}
        self._etag: str | None = None
        self._size: int | None = None
        self._sessions: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop,
            tuple[aiohttp.ClientSession, AsyncGenerator[None, None]],
        ] = weakref.WeakKeyDictionary()

    async def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        held = self._sessions.get(loop)
        if held is not None and not held[0].closed:
            return held[0]
        # Requests in flight are bounded per host by the caller.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=self._timeout,
            headers=self._headers,
            auto_decompress=False,
        )
        # The event loop closes the async generators it started when it shuts
        # down (asyncio.run does): so the session is closed with its loop,
        # even when the dataset is not.
        closer = _closing(session)
        await anext(closer)
        self._sessions[loop] = (session, closer)
        return session

    async def open(self, tail: int) -> Opened:
        """Fetch the last ``tail`` bytes (one request), learning the size and the ETag."""
        if not _on_asyncio():
            return await _on_the_portal(self.open, tail)
        what = f"the last {tail} bytes"
        try:
            async with (await self._session()).get(
                self.url, headers={"Range": f"bytes=-{tail}"}
            ) as response:
                if response.status == 416:  # an empty file has no last bytes
                    match = _UNSATISFIED.fullmatch(response.headers.get("Content-Range", ""))
                    if match is not None and int(match[1]) == 0:
                        self._pin(response, 0)
                        return Opened(0, self._validator(response), 0, b"")
                self._check_status(response, what)
                start, stop, total = self._content_range(response)
                body = await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise RemoteFileError(
                f"cannot connect to {self.host} to open {self.url}: {_reason(exc)} (is the "
                f"server running, and the URL right?)",
                self.url,
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise RemoteFileError(f"cannot open {self.url}: invalid URL", self.url) from exc
        except _TRANSIENT_ERRORS as exc:
            raise Transient(f"{type(exc).__name__}: {_reason(exc)}") from exc
        if stop != total:
            raise RemoteFileError(
                f"{self.url}: the server answered a request for {what} with bytes "
                f"{start}-{stop - 1} of {total}, not the end of the file",
                self.url,
            )
        if len(body) != stop - start:
            raise Transient(f"got {len(body)} bytes instead of {stop - start}")
        self._pin(response, total)
        return Opened(total, self._validator(response), start, body)

    def _pin(self, response: aiohttp.ClientResponse, size: int) -> None:
        self._size = size
        self._etag = response.headers.get("ETag")

    def _validator(self, response: aiohttp.ClientResponse) -> str:
        return self._etag or response.headers.get("Last-Modified") or ""

    async def fetch(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the file, as it was when opened."""
        if not _on_asyncio():
            return await _on_the_portal(self.fetch, start, stop)
        headers = {"Range": f"bytes={start}-{stop - 1}"}
        if self._etag is not None and not self._etag.startswith("W/"):
            headers["If-Match"] = self._etag  # a conforming server answers 412 if it changed
        what = f"bytes {start}-{stop - 1}"
        try:
            async with (await self._session()).get(self.url, headers=headers) as response:
                if response.status == 416:
                    raise self._changed("it is now shorter than when it was opened")
                self._check_status(response, what)
                etag = response.headers.get("ETag")
                if self._etag is not None and etag is not None and etag != self._etag:
                    raise self._changed(f"its ETag was {self._etag}, it is now {etag}")
                got_start, got_stop, total = self._content_range(response)
                if total != self._size:
                    raise self._changed(f"its size was {self._size} bytes, it is now {total}")
                if (got_start, got_stop) != (start, stop):
                    raise RemoteFileError(
                        f"{self.url}: the server answered a request for {what} with bytes "
                        f"{got_start}-{got_stop - 1}",
                        self.url,
                    )
                body = await response.read()
        except aiohttp.InvalidURL as exc:
            raise RemoteFileError(f"cannot read {self.url}: invalid URL", self.url) from exc
        except _TRANSIENT_ERRORS as exc:
            # Refused connections included: the server may be restarting.
            raise Transient(f"{type(exc).__name__}: {_reason(exc)}") from exc
        if len(body) != stop - start:
            raise Transient(f"got {len(body)} bytes instead of {stop - start}")
        return body

    def _changed(self, why: str) -> RemoteFileChangedError:
        return RemoteFileChangedError(
            f"{self.url} changed on the server while it was open ({why}): open it again",
            self.url,
        )

    def _check_status(self, response: aiohttp.ClientResponse, what: str) -> None:
        status = response.status
        if status == 206:
            return
        if status in (404, 410):
            raise RemoteFileNotFoundError(
                f"{self.url} was not found on the server (HTTP {status}): check the URL",
                self.url,
            )
        if status == 412:
            raise self._changed("its ETag no longer matches")
        if status == 200:
            raise RemoteFileError(
                f"the server of {self.url} does not answer byte-range requests (it sent the "
                f"whole file for {what}, HTTP 200): serve the file from a server that "
                f"supports 'Range: bytes=...' requests, or download it and open the local copy",
                self.url,
            )
        if status in _TRANSIENT_STATUS:
            raise Transient(f"HTTP {status} {response.reason}")
        raise RemoteFileError(
            f"the server refused to send {what} of {self.url}: HTTP {status} {response.reason}",
            self.url,
        )

    def _content_range(self, response: aiohttp.ClientResponse) -> tuple[int, int, int]:
        header = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None or match[3] == "*":
            raise RemoteFileError(
                f"the server of {self.url} answered a range request without a usable "
                f"Content-Range header ({header!r}); it cannot serve PickledDataset files",
                self.url,
            )
        return int(match[1]), int(match[2]) + 1, int(match[3])

    async def aclose(self) -> None:
        """Close this loop's session (other loops' sessions: see :meth:`close`)."""
        if not _on_asyncio():
            self.close()
            return
        held = self._sessions.pop(asyncio.get_running_loop(), None)
        if held is not None:
            await held[0].close()

    def close(self) -> None:
        """Close the sessions whose loops still run, each in its own loop."""
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        sessions, self._sessions = dict(self._sessions), weakref.WeakKeyDictionary()
        for loop, (session, _) in sessions.items():
            if loop.is_closed() or not loop.is_running():
                continue  # closed by its loop's shutdown already, or at it
            if loop is current:
                task = loop.create_task(session.close())
                _pending.add(task)
                task.add_done_callback(_pending.discard)
            else:
                asyncio.run_coroutine_threadsafe(session.close(), loop)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _on_the_portal(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await fn(*args)`` on the blocking view's asyncio loop (aiohttp needs asyncio)."""
    from .._core._portal import call

    return await anyio.to_thread.run_sync(lambda: call(fn, *args))


async def _closing(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await session.close()


#: Closing tasks, kept referenced until they finish.
_pending: set[asyncio.Task[None]] = set()


def _reason(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        seen = seen.__cause__ or seen.__context__
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__
