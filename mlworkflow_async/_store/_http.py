"""Byte ranges of a file served over HTTP(S), with ``httpx``.

Every read is one ``GET`` with a ``Range: bytes=a-b`` header. The file is
pinned when opened: its ETag (sent back as ``If-Match`` when it is a strong
one) and its size (the total of each ``Content-Range``) must stay the same,
or the read fails with :class:`~mlworkflow_async.exceptions.RemoteFileChangedError`.

Clients are bound to an event loop, so each transport keeps one
``httpx.AsyncClient`` per loop it is used from (the caller's loop, the
blocking view's loop...). Connections are kept alive between requests.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
import weakref
from collections.abc import Mapping

import httpx

from ..exceptions import RemoteFileChangedError, RemoteFileError, RemoteFileNotFoundError
from ._remote import Opened, Transient

__all__ = ["HttpTransport"]

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)
_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)", re.ASCII)
#: Answers worth asking again: the server or something in between is overloaded.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class HttpTransport:
    """Range requests to one URL; see the module docstring."""

    def __init__(
        self, url: str, *, timeout: float, headers: Mapping[str, str] | None = None
    ) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.host = f"{parts.scheme}://{parts.netloc}"
        self._timeout = timeout
        self._headers = dict(headers or {})
        self._etag: str | None = None
        self._size: int | None = None
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # The number of requests in flight is bounded per host by the
            # caller; the pool only has to keep that many connections alive.
            client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                follow_redirects=True,
                headers=self._headers,
            )
            self._clients[loop] = client
        return client

    async def open(self, tail: int) -> Opened:
        """Fetch the last ``tail`` bytes (one request), learning the size and the ETag."""
        what = f"the last {tail} bytes"
        try:
            async with self._client().stream(
                "GET", self.url, headers={"Range": f"bytes=-{tail}"}
            ) as response:
                if response.status_code == 416:  # an empty file has no last bytes
                    match = _UNSATISFIED.fullmatch(response.headers.get("content-range", ""))
                    if match is not None and int(match[1]) == 0:
                        self._pin(response, 0)
                        return Opened(0, self._validator(response), 0, b"")
                self._check_status(response, what)
                start, stop, total = self._content_range(response)
                body = await response.aread()
        except httpx.ConnectError as exc:
            raise RemoteFileError(
                f"cannot connect to {self.host} to open {self.url}: {_reason(exc)} (is the "
                f"server running, and the URL right?)",
                self.url,
            ) from exc
        except httpx.UnsupportedProtocol as exc:
            raise RemoteFileError(f"cannot open {self.url}: {exc}", self.url) from exc
        except (httpx.TimeoutException, httpx.TransportError) as exc:
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

    def _pin(self, response: httpx.Response, size: int) -> None:
        self._size = size
        self._etag = response.headers.get("etag")

    def _validator(self, response: httpx.Response) -> str:
        return self._etag or response.headers.get("last-modified", "")

    async def fetch(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the file, as it was when opened."""
        headers = {"Range": f"bytes={start}-{stop - 1}"}
        if self._etag is not None and not self._etag.startswith("W/"):
            headers["If-Match"] = self._etag  # a conforming server answers 412 if it changed
        what = f"bytes {start}-{stop - 1}"
        try:
            async with self._client().stream("GET", self.url, headers=headers) as response:
                if response.status_code == 416:
                    raise self._changed("it is now shorter than when it was opened")
                self._check_status(response, what)
                etag = response.headers.get("etag")
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
                body = await response.aread()
        except httpx.UnsupportedProtocol as exc:
            raise RemoteFileError(f"cannot read {self.url}: {exc}", self.url) from exc
        except (httpx.TimeoutException, httpx.TransportError) as exc:
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

    def _check_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
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
            raise Transient(f"HTTP {status} {response.reason_phrase}")
        raise RemoteFileError(
            f"the server refused to send {what} of {self.url}: HTTP {status} "
            f"{response.reason_phrase}",
            self.url,
        )

    def _content_range(self, response: httpx.Response) -> tuple[int, int, int]:
        header = response.headers.get("content-range", "")
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None or match[3] == "*":
            raise RemoteFileError(
                f"the server of {self.url} answered a range request without a usable "
                f"Content-Range header ({header!r}); it cannot serve PickledDataset files",
                self.url,
            )
        return int(match[1]), int(match[2]) + 1, int(match[3])

    async def aclose(self) -> None:
        """Close this loop's client (other loops' clients go with their loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        """Close the clients whose loops still run, each in its own loop."""
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        clients, self._clients = dict(self._clients), weakref.WeakKeyDictionary()
        for loop, client in clients.items():
            if loop.is_closed() or not loop.is_running():
                continue
            if loop is current:
                task = loop.create_task(client.aclose())
                _pending.add(task)
                task.add_done_callback(_pending.discard)
            else:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)


#: Closing tasks, kept referenced until they finish.
_pending: set[asyncio.Task[None]] = set()


def _reason(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:  # httpx says "All connection attempts failed"; say why
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if text:
        return text
    cause = exc.__cause__ or exc.__context__
    return str(cause) if cause is not None else type(exc).__name__
