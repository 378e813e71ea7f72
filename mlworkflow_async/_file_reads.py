"""Reading items of an open PickledDataset file without blocking the event loop.

Every read is positional (``os.pread``-like) on one file descriptor, so any
number of reads may run at once, in any threads, without a lock.

A batch of small items is first tried right on the event loop with
``preadv(..., RWF_NOWAIT)``, which copies pages already in the page cache
and refuses (``EAGAIN``) instead of waiting for the disk; cached reads thus
cost no thread hop at all. What it refuses, and batches too large to copy on
the loop, are read in one worker thread call per batch.

Large out-of-band buffers (numpy arrays of 1 MiB or more) are not copied:
they become private copy-on-write maps of the file, prefaulted in the worker
thread (``MADV_POPULATE_READ``) so that touching them later does not wait
for the disk either.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio.to_thread
import numpy as np

from ._legacy_format import looks_legacy, parse_legacy
from ._pickle_format import (
    HEADER_SIZE,
    MAGIC,
    MAP_THRESHOLD,
    Entry,
    Layout,
    check_header,
    corrupt,
    item_error,
    parse,
)
from ._safe_unpickler import make_loads

__all__ = ["FileReader", "INLINE_BYTES"]

#: A batch whose items total more bytes than this is read in a worker thread.
INLINE_BYTES = 1 << 20
#: Batches served without suspending let other tasks run this often (items).
_YIELD_EVERY = 256

_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None
_POPULATE: int | None = getattr(
    mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None
)


def _load_madvise() -> Callable[[int, int, int], None] | None:
    # ``mmap.madvise`` holds the GIL while the kernel reads the pages, which
    # would stall the event loop; a foreign call through ctypes releases it.
    if _POPULATE is None:
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).madvise
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int

    def madvise(address: int, length: int, advice: int) -> None:
        if function(address, length, advice) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return madvise


_MADVISE = _load_madvise()


def _address(mapping: mmap.mmap) -> int:
    """Where ``mapping`` starts in memory."""
    address: int = np.frombuffer(mapping, dtype=np.uint8).__array_interface__["data"][0]
    return address
# The filesystem or kernel does not support the request at all.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)}

_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class _Handle:
    """An open descriptor (and map) that closes once the last read using it ends."""

    __slots__ = ("closed", "fd", "lock", "map", "users", "view")

    def __init__(self, fd: int, use_map: bool) -> None:
        self.fd = fd
        self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if use_map else None
        self.view = memoryview(self.map) if self.map is not None else None
        self.users = 0
        self.closed = False
        self.lock = threading.Lock()

    def acquire(self, path: str) -> None:
        with self.lock:
            if self.closed:
                raise ValueError(f"the PickledDataset of {path} is closed")
            self.users += 1

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            dispose = self.closed and not self.users
        if dispose:
            self._dispose()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            dispose = not self.users
        if dispose:
            self._dispose()

    def abandon(self) -> None:
        """Close in a forked child, where the parent's lock may be held forever."""
        if not self.closed:
            self.closed = True
            self.users = 0
            self._dispose()

    def _dispose(self) -> None:
        if self.view is not None:
            self.view.release()
        if self.map is not None:
            # Arrays may still use the map; it is unmapped once they are gone.
            with contextlib.suppress(BufferError):
                self.map.close()
        os.close(self.fd)


def _read_exactly(fd: int, size: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise corrupt(path, "it is truncated")
        data += more
    return data


class FileReader:
    """The open state of a PickledDataset: index, descriptor, and the read paths."""

    def __init__(
        self, path: str, *, use_mmap: bool, safe: bool, allow: Iterable[object]
    ) -> None:
        self.path = path
        self.use_mmap = use_mmap
        self._loads = make_loads(safe, allow)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise corrupt(path, "it is not a regular file")
            self.size = info.st_size
            self.identity = (info.st_dev, info.st_ino)
            self.layout = self._parse(fd, safe, allow)
            self._handle = _Handle(fd, use_mmap)
        except BaseException:
            os.close(fd)
            raise
        self.entries = self.layout.entries
        self.inline = _NOWAIT is not None
        self.private_maps = _MADVISE is not None
        self.populate = _MADVISE is not None
        self._generation = _generation
        self._since_yield = 0

    def _parse(self, fd: int, safe: bool, allow: Iterable[object]) -> Layout:
        path, size = self.path, self.size
        if size == 0:
            raise corrupt(path, "the file is empty")

        def read(offset: int, length: int) -> bytes:
            return _read_exactly(fd, length, offset, path)

        head = read(0, min(size, HEADER_SIZE))
        if head.startswith(MAGIC):
            check_header(head, path)
            return parse(read, size, path, self._loads)
        if MAGIC.startswith(head):
            raise corrupt(path, "it is truncated inside its header")
        if looks_legacy(head):
            return parse_legacy(read, size, path, safe, allow)
        raise corrupt(
            path, "it does not start with a PickledDataset header (of this library or of "
            "the original mlworkflow)"
        )

    # -- life cycle --------------------------------------------------------

    def close(self) -> None:
        if self._generation != _generation:  # forked: do not touch the parent's lock
            self._generation = _generation
            self._handle.abandon()
        else:
            self._handle.close()

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def _live_handle(self) -> _Handle:
        if self._generation != _generation:
            self._reopen_after_fork()
        handle = self._handle
        handle.acquire(self.path)
        return handle

    def _reopen_after_fork(self) -> None:
        # The child must not share the parent's lock (it may have been held at
        # fork time) nor depend on the parent's descriptor: open afresh.
        self._generation = _generation
        old = self._handle
        if old.closed:
            return
        fd = old.fd
        try:
            new = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            new = -1
        if new >= 0:
            info = os.fstat(new)
            if (info.st_dev, info.st_ino) == self.identity:
                fd = new
            else:  # the path now names another file; keep reading ours
                os.close(new)
        self._handle = _Handle(fd, self.use_mmap)
        if fd != old.fd:
            old.abandon()
        else:  # the new handle owns the descriptor now
            old.closed = True

    # -- reads ---------------------------------------------------------------

    async def query(self, keys: Sequence[Any]) -> list[Any]:
        """The items of ``keys``, in order; at most one worker thread call."""
        handle = self._live_handle()
        try:
            if not self.inline:
                out: list[Any] = [None] * len(keys)
                cold: Sequence[int] = range(len(keys))
            elif handle.view is None:
                out, cold = self._read_inline(handle, keys)
            else:
                out, cold = self._read_inline_mapped(handle, keys)
            if cold:
                await anyio.to_thread.run_sync(self._read_blocking, handle, keys, cold, out)
            else:
                self._since_yield += len(out)
                if self._since_yield >= _YIELD_EVERY:
                    self._since_yield = 0
                    await asyncio.sleep(0)
        finally:
            handle.release()
        return out

    def _failure(self, key: object, exc: Exception) -> Exception:
        """The error to raise when looking up or unpickling ``key`` raised ``exc``."""
        try:
            known = key in self.entries
        except TypeError:
            return KeyError(f"{key!r} (unhashable) is not a key of {self.path}")
        if not known:
            return KeyError(f"{key!r} is not a key of the PickledDataset {self.path}")
        return item_error(self.path, key, exc)

    def _read_inline(self, handle: _Handle, keys: Sequence[Any]) -> tuple[list[Any], list[int]]:
        """Serve cached items on the calling thread; also return the indices left to read.

        This is the hot path of batches of small items: keep it lean.
        """
        entries, fd, loads, preadv = self.entries, handle.fd, self._loads, os.preadv
        nowait: int = _NOWAIT  # type: ignore[assignment]
        out: list[Any] = []
        append = out.append
        cold: list[int] = []
        budget = INLINE_BYTES
        key = None
        try:
            for key in keys:
                offset, span, plen, buffers = entries[key]
                if span >= budget:
                    cold.append(len(out))
                    append(None)
                    continue
                budget -= span
                buf = bytearray(span)
                try:
                    got = preadv(fd, (buf,), offset, nowait)
                except BlockingIOError:  # not in the page cache
                    got = -1
                except OSError as exc:  # left to the blocking path to report
                    if exc.errno in _UNSUPPORTED:
                        self.inline = False
                        budget = 0
                    got = -1
                if got != span:  # also when partly cached
                    cold.append(len(out))
                    append(None)
                elif buffers is None:
                    append(loads(buf))
                else:
                    whole = memoryview(buf)
                    if len(buffers) == 1:
                        ((a, b),) = buffers
                        append(loads(whole[:plen], buffers=(whole[a:b],)))
                    else:
                        append(loads(whole[:plen], buffers=[whole[a:b] for a, b in buffers]))
        except Exception as exc:
            failure = self._failure(key, exc)
            raise failure from (None if isinstance(failure, KeyError) else exc)
        return out, cold

    def _read_inline_mapped(
        self, handle: _Handle, keys: Sequence[Any]
    ) -> tuple[list[Any], list[int]]:
        """:meth:`_read_inline` for ``mmap=True``: read pickles, map buffers."""
        entries, fd, loads, view = self.entries, handle.fd, self._loads, handle.view
        assert view is not None
        nowait: int = _NOWAIT  # type: ignore[assignment]
        out: list[Any] = []
        cold: list[int] = []
        budget = INLINE_BYTES
        key = None
        try:
            for key in keys:
                offset, span, plen, buffers = entries[key]
                got = -1
                if span < budget:
                    budget -= span
                    buf = bytearray(plen)
                    try:
                        got = os.preadv(fd, (buf,), offset, nowait)
                    except OSError as exc:
                        if exc.errno in _UNSUPPORTED:
                            self.inline = False
                            budget = 0
                if got != plen:
                    cold.append(len(out))
                    out.append(None)
                elif buffers is None:
                    out.append(loads(buf))
                else:
                    out.append(
                        loads(buf, buffers=[view[offset + a:offset + b] for a, b in buffers])
                    )
        except Exception as exc:
            failure = self._failure(key, exc)
            raise failure from (None if isinstance(failure, KeyError) else exc)
        return out, cold

    def _read_blocking(
        self, handle: _Handle, keys: Sequence[Any], todo: Iterable[int], out: list[Any]
    ) -> None:
        entries = self.entries
        for index in todo:
            key = keys[index]
            try:
                entry = entries[key]
            except Exception as exc:
                raise self._failure(key, exc) from None
            try:
                data, buffers = self._fetch(handle, key, entry)
            except BaseException as exc:
                if not getattr(exc, "path", None):
                    exc.add_note(f"while reading item {key!r} of {self.path}")
                raise
            try:
                out[index] = self._loads(data, buffers=buffers)
            except Exception as exc:
                raise item_error(self.path, key, exc) from exc

    def _fetch(self, handle: _Handle, key: object, entry: Entry) -> tuple[Any, list[Any] | None]:
        """The pickle bytes of an item and its out-of-band buffers, read or mapped."""
        offset, span, plen, buffers = entry
        fd, view = handle.fd, handle.view
        if buffers is None:
            return self._read(fd, key, span, offset), None
        if view is not None:
            assert handle.map is not None
            for a, b in buffers:
                if b - a >= MAP_THRESHOLD:
                    self._populate(handle.map, key, offset + a, b - a)
            data = self._read(fd, key, plen, offset)
            return data, [view[offset + a:offset + b] for a, b in buffers]
        if span < MAP_THRESHOLD:
            whole = memoryview(self._read(fd, key, span, offset))
            return whole[:plen], [whole[a:b] for a, b in buffers]
        loaded: list[Any] = []
        for a, b in buffers:
            mapped = None
            if b - a >= MAP_THRESHOLD and self.private_maps:
                mapped = self._map_private(fd, key, offset + a, b - a)
            if mapped is None:
                mapped = memoryview(self._read(fd, key, b - a, offset + a))
            loaded.append(mapped)
        return self._read(fd, key, plen, offset), loaded

    def _read(self, fd: int, key: object, size: int, offset: int) -> bytearray:
        buf = bytearray(size)
        view = memoryview(buf)
        done = 0
        while done < size:
            got = os.preadv(fd, (view[done:],), offset + done)
            if not got:
                raise self._past_end(key)
            done += got
        return buf

    def _map_private(self, fd: int, key: object, start: int, size: int) -> memoryview | None:
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            private = mmap.mmap(fd, start + size - base, access=mmap.ACCESS_COPY, offset=base)
        except ValueError:  # the file is now shorter than the index says
            raise self._past_end(key) from None
        assert _MADVISE is not None
        assert _POPULATE is not None
        try:
            _MADVISE(_address(private), len(private), _POPULATE)
        except OSError as exc:
            private.close()
            if exc.errno in _UNSUPPORTED:
                self.private_maps = False  # copy instead, from now on
                return None
            raise self._populate_error(key, exc) from exc
        return memoryview(private)[start - base:start - base + size]

    def _populate(self, shared: mmap.mmap, key: object, start: int, size: int) -> None:
        if not self.populate:
            return
        assert _MADVISE is not None
        assert _POPULATE is not None
        base = start - start % mmap.PAGESIZE
        try:
            _MADVISE(_address(shared) + base, start + size - base, _POPULATE)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self.populate = False
            else:
                raise self._populate_error(key, exc) from exc

    def _populate_error(self, key: object, exc: OSError) -> Exception:
        # EFAULT: touching the pages would have raised SIGBUS (beyond the end).
        return self._past_end(key) if exc.errno == errno.EFAULT else exc

    def _past_end(self, key: object) -> Exception:
        return corrupt(
            self.path, f"item {key!r} extends past the end of the file (was it truncated "
            f"after being opened?)"
        )
