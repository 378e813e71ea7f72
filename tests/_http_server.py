"""A loopback HTTP file server for the example tests.

It serves in-memory files from a thread of the test process, after a small
delay per request, and records the largest number of requests it was
processing at the same time: the figure the downloader tests check their
concurrency bound against. Unknown paths answer 404.

Two kinds of files misbehave on purpose, to test what a client leaves on
disk: a *held* file's reply stops after half its body until ``release`` is
set (``half_sent`` tells when it got there), and a *cut* file's connection
closes after half its body, short of the length its headers promised.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["FileServer", "refused_url", "serve_files", "sha256"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer:
    """What a running server serves and what it saw."""

    def __init__(
        self,
        files: dict[str, bytes],
        delay: float,
        held: frozenset[str] = frozenset(),
        cut: frozenset[str] = frozenset(),
    ) -> None:
        self.files = files
        self.delay = delay
        self.held = held
        self.cut = cut
        self.half_sent = threading.Event()
        self.release = threading.Event()
        self.base_url = ""
        self.active = 0
        self.max_active = 0
        self.requests = 0
        self._lock = threading.Lock()

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def enter(self) -> None:
        with self._lock:
            self.active += 1
            self.requests += 1
            self.max_active = max(self.max_active, self.active)

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


def _handler(state: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real clients expect
        disable_nagle_algorithm = True  # headers and body go out as separate writes

        def do_GET(self) -> None:
            state.enter()
            try:
                time.sleep(state.delay)
                name = self.path.lstrip("/")
                body = state.files.get(name)
            finally:
                # Before the reply is written: a client cannot start its next
                # request while this one still counts, so the count never
                # exceeds the client's own number of requests in flight.
                state.leave()
            if body is None:
                self.send_error(404, explain=f"no such file: {self.path}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name not in state.held and name not in state.cut:
                self.wfile.write(body)
                return
            half = len(body) // 2
            self.wfile.write(body[:half])  # unbuffered: on the wire now
            if name in state.cut:
                self.close_connection = True
                return
            state.half_sent.set()
            state.release.wait(60)
            self.wfile.write(body[half:])

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of concurrent connects must not be refused

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a downloader cancelling after a failure)
        # leaves a broken pipe behind: expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def serve_files(
    files: dict[str, bytes],
    delay: float = 0.003,
    held: Iterable[str] = (),
    cut: Iterable[str] = (),
) -> Iterator[FileServer]:
    """Serve ``files`` (name -> bytes) on 127.0.0.1 for the duration of the block.

    The names in ``held`` and ``cut`` misbehave as the module says.
    """
    state = FileServer(files, delay, frozenset(held), frozenset(cut))
    server = _Server(("127.0.0.1", 0), _handler(state))
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="test-file-server", daemon=True
    )
    # Server threads and the client under test share the GIL: a short switch
    # interval keeps each hand-off between them from costing up to 5 ms.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    thread.start()
    try:
        yield state
    finally:
        sys.setswitchinterval(interval)
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def refused_url() -> str:
    """A loopback URL on a port nobody listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing-here"
