"""Let a signal wake an event loop that sleeps in the main thread.

Python runs signal handlers in the main thread, but the operating system may
deliver a signal to any thread. While a runner's work runs in worker
threads, the main thread often sleeps in the loop's ``select()`` with
nothing due, and a Ctrl-C caught by a worker thread then waits until
something else wakes the loop (``asyncio.run`` installs its SIGINT handler
without a wake-up file descriptor): a run could go on for its whole length
after Ctrl-C. While a runner is open, a wake-up socket is installed with
:func:`signal.set_wakeup_fd` unless one is installed already.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading


class _Wakeup:
    __slots__ = ("loop", "reader", "users", "writer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.users = 1
        loop.add_reader(self.reader.fileno(), self._drain)

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self.loop.remove_reader(self.reader.fileno())
        self.reader.close()
        self.writer.close()


_installed: _Wakeup | None = None


def hold(loop: asyncio.AbstractEventLoop) -> bool:
    """Make sure a signal wakes ``loop``; True if :func:`release` is to be called."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False  # only the main thread may install one, and only it runs handlers
    if _installed is not None:
        if _installed.loop is not loop:
            return False
        _installed.users += 1
        return True
    previous = signal.set_wakeup_fd(-1)
    if previous != -1:  # someone else's (asyncio's add_signal_handler, ...): keep it
        signal.set_wakeup_fd(previous)
        return False
    try:
        wakeup = _Wakeup(loop)
    except (OSError, NotImplementedError):  # a loop without add_reader
        return False
    signal.set_wakeup_fd(wakeup.writer.fileno(), warn_on_full_buffer=False)
    _installed = wakeup
    return True


def release() -> None:
    """Undo one :func:`hold` that returned True."""
    global _installed
    wakeup = _installed
    if wakeup is None:
        return
    wakeup.users -= 1
    if wakeup.users:
        return
    _installed = None
    current = signal.set_wakeup_fd(-1)
    if current != wakeup.writer.fileno():  # replaced meanwhile: leave the new one
        signal.set_wakeup_fd(current)
    wakeup.close()
