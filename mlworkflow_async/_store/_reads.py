"""Reading items of an open PickledDataset file without blocking the event loop.

Every read is positional (``os.pread``-like) on one file descriptor, so any
number of reads may run at once, in any threads, without a lock.

A batch of small items is first tried right on the event loop with
``preadv(..., RWF_NOWAIT)``, which copies pages already in the page cache
and refuses (``EAGAIN``) instead of waiting for the disk; cached reads thus
cost no thread hop at all. What it refuses, and batches too large to copy on
the loop, are read in one worker thread call per batch.

Large out-of-band buffers (numpy arrays of 1 MiB or more) are not copied:
they become private copy-on-write maps of the file. Such an item is served
on the loop when all its pages are in the page cache (``mincore``); if not,
the worker thread reads them in and maps them (``MADV_POPULATE_READ``).
Either way, touching the array later does not wait for the disk.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from . import _page_cache as pages
from ._format import (
    ALIGN,
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
from ._legacy import looks_legacy, parse_legacy
from ._safe_unpickler import make_loads

__all__ = ["FileReader", "INLINE_BYTES"]

#: A batch whose items total more bytes than this is read in a worker thread.
INLINE_BYTES = 1 << 20
#: Batches served without suspending let other tasks run this often (items).
_YIELD_EVERY = 256

_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None
# The filesystem or kernel does not support the request at all.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)}

_generation = 0
_COLD = object()  # an item that must be read in a worker thread
# Scratch space receiving the padding between a pickle and its buffer; what
# lands there is never read, so concurrent reads may share it.
_GAPS = [bytearray(size) for size in range(ALIGN)]


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
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(
                    errno.EISDIR, "Is a directory, not a PickledDataset file", path
                )
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
        # Whether the page cache can be queried and populated (Linux).
        self.private_maps = pages.AVAILABLE
        self.populate = pages.AVAILABLE
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
        handle, out, rest = self._begin(keys)
        try:
            if rest is not None:
                await anyio.to_thread.run_sync(rest)
            else:
                self._since_yield += len(out)
                if self._since_yield >= _YIELD_EVERY:
                    self._since_yield = 0
                    await anyio.lowlevel.checkpoint()
        finally:
            handle.release()
        return out

    def query_blocking(self, keys: Sequence[Any]) -> list[Any]:
        """:meth:`query` on the calling thread, the items not cached read there too."""
        handle, out, rest = self._begin(keys)
        try:
            if rest is not None:
                rest()
        finally:
            handle.release()
        return out

    def _begin(
        self, keys: Sequence[Any]
    ) -> tuple[_Handle, list[Any], Callable[[], None] | None]:
        """Serve the cached items of ``keys`` here; return the handle in use (acquired),
        the items (None where not served yet), and what reads the rest (blocking), if any."""
        handle = self._live_handle()
        try:
            if not self.inline:
                out: list[Any] = [None] * len(keys)
                cold: Sequence[int] = range(len(keys))
            elif handle.view is None:
                out, cold = self._read_inline(handle, keys)
            else:
                out, cold = self._read_inline_mapped(handle, keys)
        except BaseException:
            handle.release()
            raise
        rest = functools.partial(self._read_blocking, handle, keys, cold, out) if cold else None
        return handle, out, rest

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
                    item = _COLD
                    if buffers is not None and span >= MAP_THRESHOLD and self.private_maps:
                        item = self._large_inline(fd, offset, plen, buffers)
                    if item is _COLD:
                        cold.append(len(out))
                    append(None if item is _COLD else item)
                    continue
                budget -= span
                buf = bytearray(plen)
                if buffers is None:
                    parts: tuple[bytearray, ...] = (buf,)
                elif len(buffers) == 1 and buffers[0][0] - plen < ALIGN:
                    # Scattered straight into the pickle's and the array's own
                    # buffers: no slicing, and the array is aligned in memory.
                    ((a, b),) = buffers
                    array = bytearray(b - a)
                    parts = (buf, _GAPS[a - plen], array)
                else:
                    buf = bytearray(span)
                    parts = (buf,)
                try:
                    got = preadv(fd, parts, offset, nowait)
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
                elif len(parts) == 3:
                    append(loads(buf, buffers=(array,)))
                else:
                    whole = memoryview(buf)
                    append(loads(whole[:plen], buffers=[whole[a:b] for a, b in buffers]))
        except Exception as exc:
            failure = self._failure(key, exc)
            raise failure from (None if isinstance(failure, KeyError) else exc)
        return out, cold

    def _large_inline(
        self, fd: int, offset: int, plen: int, buffers: tuple[tuple[int, int], ...]
    ) -> Any:
        """An item with large buffers, if all its pages are cached; else ``_COLD``.

        Its large buffers are mapped, not copied: cheap enough for the loop.
        """
        nowait: int = _NOWAIT  # type: ignore[assignment]
        data = bytearray(plen)
        loaded: list[Any] = []
        try:
            if os.preadv(fd, (data,), offset, nowait) != plen:
                return _COLD
            for a, b in buffers:
                size = b - a
                if size >= MAP_THRESHOLD:
                    mapped = self._map_private(fd, None, offset + a, size, inline=True)
                    if mapped is None:
                        return _COLD
                    loaded.append(mapped)
                else:
                    small = bytearray(size)
                    if os.preadv(fd, (small,), offset + a, nowait) != size:
                        return _COLD
                    loaded.append(small)
        except OSError:  # not cached, or failing: the worker thread will tell
            return _COLD
        return self._loads(data, buffers=loaded)

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
                if buffers is not None and span >= MAP_THRESHOLD:
                    ready = self.populate and self._resident(handle, offset, buffers)
                else:
                    ready = span < budget
                    budget -= span
                if ready:
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

    def _map_private(
        self, fd: int, key: object, start: int, size: int, inline: bool = False
    ) -> memoryview | None:
        """A private copy-on-write map of ``[start, start + size)`` of the file.

        ``inline``: only if its pages are all in the page cache (a cheap
        check), else None. Otherwise the pages are read in and mapped now,
        in this worker thread; None if the kernel cannot (copy instead).
        """
        known = pages.cached(fd, start, size) if inline else None
        if known is False:
            return None
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            private = mmap.mmap(fd, start + size - base, access=mmap.ACCESS_COPY, offset=base)
        except ValueError:  # the file is now shorter than the index says
            if inline:
                return None
            raise self._past_end(key) from None
        try:
            if inline:
                if known is None and not pages.resident(private, 0, len(private)):
                    private.close()
                    return None
            else:
                pages.populate(private, 0, len(private))
        except OSError as exc:
            private.close()
            if exc.errno in _UNSUPPORTED:
                self.private_maps = False  # copy instead, from now on
                return None
            if inline:
                return None
            raise self._populate_error(key, exc) from exc
        return memoryview(private)[start - base:start - base + size]

    def _resident(self, handle: _Handle, offset: int, buffers: tuple[tuple[int, int], ...]) -> bool:
        """Whether the large buffers of an item are in the page cache (``mmap=True``)."""
        shared = handle.map
        assert shared is not None
        try:
            for a, b in buffers:
                if b - a >= MAP_THRESHOLD:
                    known = pages.cached(handle.fd, offset + a, b - a)
                    if known is None:
                        known = pages.resident(shared, offset + a, b - a)
                    if not known:
                        return False
        except OSError:
            return False
        return True

    def _populate(self, shared: mmap.mmap, key: object, start: int, size: int) -> None:
        if not self.populate:
            return
        try:
            pages.populate(shared, start, size)
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
