"""Destinations for a file being written: a temporary file renamed into place, or a file object.

All methods block; callers run them in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from typing import Any, BinaryIO, Protocol

__all__ = ["AtomicFile", "FileObject", "Sink"]

_IOV_MAX = 1024
with contextlib.suppress(AttributeError, OSError, ValueError):
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))


class Sink(Protocol):
    name: str

    def write(self, buffers: list[Any]) -> None: ...

    def commit(self) -> None: ...

    def discard(self) -> None: ...


def _remainder(buffers: list[Any], written: int) -> list[Any]:
    """What is left of ``buffers`` once their first ``written`` bytes are out."""
    for index, buffer in enumerate(buffers):
        size = len(buffer)
        if written < size:
            return [memoryview(buffer)[written:], *buffers[index + 1:]]
        written -= size
    return []


def _naming(exc: OSError, path: str, what: str = "") -> OSError:
    """``exc`` again (same class and errno), but naming ``path``, the file being written."""
    reason = exc.strerror or str(exc)
    return type(exc)(exc.errno, f"cannot write {path}: {what or reason}", path)


class AtomicFile:
    """Writes go to a temporary file next to ``path``; :meth:`commit` renames it into place.

    Until then ``path`` is untouched; :meth:`discard` deletes the temporary file.
    Every ``OSError`` names ``path`` (the temporary file is an implementation
    detail), and on any failure the temporary file is gone.
    """

    def __init__(self, path: str) -> None:
        self.name = path
        if os.path.isdir(path):  # else found only at the final rename
            raise IsADirectoryError(
                errno.EISDIR, f"cannot write {path}: it is a directory", path
            )
        folder, base = os.path.split(os.path.abspath(path))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            self.temporary = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
            try:
                # Mode 0o666 lets the umask decide, as for any new file.
                self._fd = os.open(self.temporary, flags, 0o666)
                break
            except FileExistsError:
                continue
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT, f"cannot write {path}: its folder does not exist", folder
                ) from None
            except PermissionError as exc:
                raise _naming(
                    exc, path, f"no permission to create files in its folder {folder}"
                ) from None
            except OSError as exc:
                raise _naming(exc, path) from exc
        self._open = True
        self._done = False
        # A cancelled caller may discard while its worker thread still writes:
        # the lock makes discard wait, so the descriptor is never closed (and
        # reused by another file) under a running write.
        self._lock = threading.RLock()

    def write(self, buffers: list[Any]) -> None:
        with self._lock:
            if not self._open:
                raise ValueError(f"cannot write {self.name}: the write was discarded or committed")
            fd = self._fd
            try:
                for start in range(0, len(buffers), _IOV_MAX):
                    part = buffers[start:start + _IOV_MAX]
                    expected = sum(map(len, part))
                    written = os.writev(fd, part)
                    while written < expected:  # short writes are rare but legal
                        part = _remainder(part, written)
                        expected -= written
                        written = os.writev(fd, part)
            except OSError as exc:  # e.g. the disk is full
                raise _naming(exc, self.name) from exc

    def commit(self) -> None:
        with self._lock:
            try:
                os.fsync(self._fd)
                self._open = False
                os.close(self._fd)
                os.replace(self.temporary, self.name)
            except OSError as exc:
                self.discard()
                raise _naming(exc, self.name) from exc
            self._done = True
        # Make the rename itself durable; not every platform can open a folder.
        with contextlib.suppress(OSError):
            folder = os.open(os.path.dirname(os.path.abspath(self.name)), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def discard(self) -> None:
        with self._lock:
            if not self._done:
                self._done = True
                if self._open:
                    self._open = False
                    with contextlib.suppress(OSError):
                        os.close(self._fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.temporary)


class FileObject:
    """Writes go straight to an open binary file; nothing can be undone."""

    def __init__(self, file: BinaryIO) -> None:
        self.name = str(getattr(file, "name", repr(file)))
        if file.seekable() and file.tell() != 0:
            raise ValueError(
                f"cannot write a PickledDataset into {self.name} at position {file.tell()}: "
                f"the file object must be at its start"
            )
        self._file = file

    def write(self, buffers: list[Any]) -> None:
        write = self._file.write
        for buffer in buffers:
            written = write(buffer)
            if written is not None and written < len(buffer):  # a raw, unbuffered file
                view = memoryview(buffer)
                while written < len(view):
                    written += write(view[written:]) or 0

    def commit(self) -> None:
        self._file.flush()
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.fsync(self._file.fileno())

    def discard(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._file.flush()
