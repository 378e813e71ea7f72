"""A real HTTP file server on 127.0.0.1 for the remote-file tests and benchmarks.

uvicorn runs a Starlette app whose ``FileResponse`` answers byte-range
requests (with an ETag and ``Content-Range``), serving the files of one
folder. A :class:`Faults` object, changeable while the server runs, adds
latency, answers 503, drops connections mid-answer, or ignores ``Range``
headers, and the server records every request (path and range) it got.

In the test process: ``with serve_folder(folder) as server: server.url("f.pkl")``
(the server runs in a thread). In its own process, for benchmarks:
``python -m tests._range_server FOLDER --latency 0.002`` prints its base URL.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

__all__ = ["Faults", "RangeServer", "serve_folder"]


@dataclass
class Faults:
    """What the server does wrong; every request is counted before faults apply."""

    latency: float = 0.0  # seconds added to every request
    fail_every: int = 0  # answer 503 to every N-th request (0: never)
    drop_every: int = 0  # close the connection halfway through every N-th answer
    ignore_ranges: bool = False  # answer 200 with the whole file, as a server without ranges
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    active: int = 0  # requests being answered now
    max_active: int = 0  # the most answered at once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, path: str, range_header: str | None) -> int:
        with self._lock:
            self.requests.append((path, range_header))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            return len(self.requests)

    def done(self) -> None:
        with self._lock:
            self.active -= 1

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_active = self.active

    def ranged(self, path: str) -> list[str]:
        """The ``Range`` headers of the requests for ``path``, in order."""
        return [r or "" for p, r in list(self.requests) if p == path]


class _DropConnection(Exception):
    pass


def _from_memory(request: Request, held: tuple[bytes, str] | None) -> Response:
    """One ``bytes=a-b`` or ``bytes=-n`` range of held bytes (what the benchmarks ask)."""
    if held is None:
        return PlainTextResponse("no such file", status_code=404)
    data, etag = held
    size = len(data)
    first, _, last = request.headers.get("range", "").removeprefix("bytes=").partition("-")
    if not first:
        start, stop = max(0, size - int(last)), size
    else:
        start, stop = int(first), min(size, int(last) + 1) if last else size
    headers = {"Content-Range": f"bytes {start}-{stop - 1}/{size}", "ETag": etag}
    return Response(data[start:stop], status_code=206, headers=headers)


def make_app(folder: str, faults: Faults, in_memory: bool = False) -> Any:
    """The app; ``in_memory`` answers from the files' bytes read at start (no disk, no threads)."""
    held: dict[str, tuple[bytes, str]] = {}
    if in_memory:
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as file:
                data = file.read()
            held[name] = data, f'"{hashlib.md5(data).hexdigest()}"'

    async def serve(request: Request) -> Response:
        name = request.path_params["name"]
        if in_memory:
            return _from_memory(request, held.get(name))
        path = os.path.join(folder, name)
        if ".." in name.split("/") or not await anyio.Path(path).is_file():
            return PlainTextResponse(f"no such file: {name}", status_code=404)
        return FileResponse(path)

    app = Starlette(routes=[Route("/{name:path}", serve)])

    async def faulty(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        number = faults.count(scope["path"].lstrip("/"), headers.get(b"range", b"").decode()
                              or None)
        finished = False

        def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                faults.done()

        async def counted(message: Any) -> None:
            # Done before the last bytes go out: the client cannot send its
            # next request while this one still counts as active.
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finish()
            await send(message)

        try:
            await answer(number, scope, receive, counted)
        finally:
            finish()

    async def answer(number: int, scope: Any, receive: Any, send: Any) -> None:
        if faults.latency:
            await anyio.sleep(faults.latency)
        if faults.fail_every and number % faults.fail_every == 0:
            return await PlainTextResponse("try again", status_code=503)(scope, receive, send)
        if faults.ignore_ranges:
            scope = dict(scope, headers=[h for h in scope["headers"] if h[0] != b"range"])
        if faults.drop_every and number % faults.drop_every == 0:
            async def dropping(message: Any) -> None:
                if message["type"] == "http.response.body":
                    body = message.get("body", b"")
                    await send({"type": "http.response.body", "body": body[:len(body) // 2],
                                "more_body": True})
                    raise _DropConnection  # uvicorn closes the connection mid-answer
                await send(message)

            return await app(scope, receive, dropping)
        return await app(scope, receive, send)

    return faulty


class RangeServer:
    """A running server: its base URL and its :class:`Faults`."""

    def __init__(self, base_url: str, faults: Faults) -> None:
        self.base_url = base_url
        self.faults = faults

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def _config(folder: str, faults: Faults, in_memory: bool = False) -> uvicorn.Config:
    return uvicorn.Config(
        make_app(folder, faults, in_memory), log_level="critical", lifespan="off", access_log=False,
        timeout_keep_alive=30,
    )


@contextmanager
def serve_folder(folder: str, faults: Faults | None = None) -> Iterator[RangeServer]:
    """Serve ``folder`` on 127.0.0.1, from a thread, for the duration of the block."""
    faults = faults or Faults()
    sock = _listening_socket()
    port = sock.getsockname()[1]
    ready = threading.Event()
    server = _Server(_config(folder, faults), ready)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="range-server", daemon=True
    )
    thread.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the test HTTP server did not start")
        yield RangeServer(f"http://127.0.0.1:{port}", faults)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _listening_socket() -> socket.socket:
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections
    # only then, and without it headers and body wait on delayed ACKs (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


def refused_url() -> str:
    """A loopback URL on a port nobody listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing-here"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve a folder on 127.0.0.1")
    parser.add_argument("folder")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--in-memory", action="store_true", help="answer from memory")
    args = parser.parse_args(argv)
    faults = Faults(latency=args.latency)
    sock = _listening_socket()
    ready = threading.Event()
    server = _Server(_config(args.folder, faults, args.in_memory), ready)
    threading.Thread(
        target=lambda: ready.wait() and print(
            f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True
        ),
        daemon=True,
    ).start()
    server.run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
