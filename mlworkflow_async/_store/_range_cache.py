"""An on-disk cache of the byte ranges fetched from a remote file.

Each remote file (URL, validator, size) has one cache file in the cache
folder, named by a hash of them, so a file changed on the server gets a new
one. The cache file is sparse: the fetched bytes are written at their own
offsets, and a table of one byte per block, after the data, marks the blocks
present (1) once their bytes are written. Reads go by the table only.

That order makes it safe for several processes (and threads) at once: a
block is read only after its mark, and its mark is written only after its
bytes, by ``pwrite`` to the same file; two processes filling the same block
write the same bytes (the validator pins them), so nothing they do in any
interleaving corrupts it. A process killed mid-write leaves blocks unmarked,
fetched again later. A block once marked never changes, so mapping the cache
file (``mmap=True``) is safe too.

The folder is bounded in size (the disk space of its cache files, counted
when a file is opened, then as blocks are added): when it grows past the
bound, the cache files used least recently (their modification times) are
deleted. A process still reading a deleted one
keeps its copy until it closes it. When one file alone reaches the bound,
blocks are no longer added for it: reads go to the server instead.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
from collections.abc import Sequence

__all__ = ["RangeCache", "DEFAULT_BLOCK", "DEFAULT_LIMIT"]

#: Bytes per block: the unit fetched and marked.
DEFAULT_BLOCK = 16 << 10
#: The default bound of a cache folder, in bytes.
DEFAULT_LIMIT = 8 << 30
_SUFFIX = ".ranges"
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None
_PAGE = 4096


def cache_name(url: str, validator: str, size: int, block: int) -> str:
    digest = hashlib.sha256(f"{url}\0{validator}\0{size}\0{block}".encode()).hexdigest()
    return digest[:40] + _SUFFIX


class RangeCache:
    """The cached blocks of one remote file. Its methods block: call them in a worker thread."""

    def __init__(
        self, folder: str, url: str, validator: str, size: int, *, block: int, limit: int
    ) -> None:
        if block < 1 or block % _PAGE:
            raise ValueError(f"cache_block must be a positive multiple of {_PAGE}, got {block}")
        self.folder = folder
        self.size = size
        self.block = block
        self.limit = limit
        self.blocks = -(-size // block)
        self._table_at = -(-size // _PAGE) * _PAGE
        self.path = os.path.join(folder, cache_name(url, validator, size, block))
        #: Blocks known to be present; a block once marked stays marked.
        self.present = bytearray(self.blocks)
        self.full = False
        self._usage = 0  # of the folder, as last counted plus what was added since
        self._map: mmap.mmap | None = None
        os.makedirs(folder, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            length = self._table_at + self.blocks
            if os.fstat(self.fd).st_size < length:
                os.ftruncate(self.fd, length)  # never shrinks what another process wrote
            os.utime(self.fd)
            self._refresh(0, self.blocks)
            self._bound(0)
        except BaseException:
            os.close(self.fd)
            raise

    # -- reads ---------------------------------------------------------------

    def span_blocks(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.block, -(-(offset + length) // self.block)

    def _refresh(self, first: int, stop: int) -> None:
        """Learn which of blocks ``[first, stop)`` other processes have filled."""
        if first < stop:
            marks = os.pread(self.fd, stop - first, self._table_at + first)
            present = self.present
            for i, mark in enumerate(marks, first):
                if mark:
                    present[i] = 1

    def has(self, offset: int, length: int) -> bool:
        first, stop = self.span_blocks(offset, length)
        if self.present.find(0, first, stop) < 0:
            return True
        self._refresh(first, stop)
        return self.present.find(0, first, stop) < 0

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes | bytearray | None]:
        """The bytes of each ``(offset, length)``, or None where some block is missing."""
        out: list[bytes | bytearray | None] = []
        for offset, length in ranges:
            if self.has(offset, length):
                data = os.pread(self.fd, length, offset)
                out.append(data if len(data) == length else None)
            else:
                out.append(None)
        return out

    def read_nowait(
        self, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes | bytearray | None] | None:
        """:meth:`read`, on the calling thread, if every range is marked and in the page cache.

        Else None, without waiting on the disk: call :meth:`read` in a worker thread then.
        """
        if _NOWAIT is None:
            return None
        present, block, fd = self.present, self.block, self.fd
        out: list[bytes | bytearray | None] = []
        try:
            for offset, length in ranges:
                if present.find(0, offset // block, -(-(offset + length) // block)) >= 0:
                    return None
                buf = bytearray(length)
                if os.preadv(fd, (buf,), offset, _NOWAIT) != length:
                    return None
                out.append(buf)
        except OSError:  # not cached (EAGAIN), or not supported here
            return None
        return out

    def view(self) -> memoryview:
        """A read-only map of the cached bytes (read only the blocks marked present)."""
        if self._map is None:
            self._map = mmap.mmap(self.fd, self._table_at + self.blocks, access=mmap.ACCESS_READ)
        return memoryview(self._map)[:self.size]

    # -- writes --------------------------------------------------------------

    def write(self, start: int, data: bytes | memoryview) -> None:
        """Store bytes fetched from ``start``, a block boundary, then mark their whole blocks."""
        if self.full:
            return
        first = start // self.block
        stop = (start + len(data)) // self.block
        if start + len(data) == self.size:
            stop = self.blocks  # the last block ends with the file
        if stop <= first:
            return
        view = memoryview(data)[:min(len(data), (stop - first) * self.block)]
        if self._usage + len(view) > self.limit:
            # Make room first: bytes past the bound are never stored, even once.
            self._bound(len(view))
            if self.full:
                return
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], start + done)
            os.pwrite(self.fd, b"\1" * (stop - first), self._table_at + first)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                self.full = True  # no room: keep reading from the server
                return
            raise
        self.present[first:stop] = b"\1" * (stop - first)
        self._usage += len(view)

    def _bound(self, adding: int) -> None:
        """Delete the least recently used cache files until ``adding`` more bytes fit."""
        files: list[tuple[float, int, str]] = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.name.endswith(_SUFFIX):
                    continue
                with contextlib.suppress(OSError):
                    info = entry.stat()
                    files.append((info.st_mtime, info.st_blocks * 512, entry.path))
        used = sum(usage for _, usage, _ in files) + adding
        files.sort()
        for _, usage, path in files:
            if used <= self.limit:
                break
            if path == self.path:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            used -= usage
        self._usage = used - adding
        if used > self.limit:
            self.full = True

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # arrays still view it: the GC closes it
                self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
