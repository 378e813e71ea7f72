"""Reading format 2 files: every byte checked, batches of arrays read straight into place.

Opening costs two reads whatever the size (header and footer, then the
index region, which a local file maps). Items are then read as in format 1
(:mod:`mlworkflow_async._store._reads`): cached small items on the event
loop with ``preadv(RWF_NOWAIT)``, the others in one worker thread call per
batch, and arrays of 1 MiB or more as maps of the file. Each item's span is
checked against its checksum before it is unpickled.

Verification policy (``verify=``):

- ``"all"`` (default): every byte is checked. Mapped arrays are hashed
  in the worker thread that maps them, the first time their item is read
  from this open dataset (CRC-32C runs at about 17 GB/s, a few percent of
  what reading from disk costs); later reads of the item map them
  unchecked, and check the rest of the item (its pickle, padding and
  smaller arrays).
- ``"copied"``: items are checked except their mapped arrays, which then
  cost nothing beyond the map: the rest of such an item is checked against
  the checksum the file keeps of it, at every read. Everything below the
  mapping threshold is still checked. Files written before that checksum
  was kept (their footer lacks flag 2) cannot check the rest of such an
  item apart: it is checked whole the first time it is read, as with
  ``"all"`` (rewrite the file with ``python -m mlworkflow_async convert``
  to avoid that).

A batch of items that are each one large array of the same size, collated
by the default collation, is read with one ``preadv`` per item straight
into its slot of the batch (:meth:`Reader2.query_batch`).
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import anyio.lowlevel
import anyio.to_thread
import numpy as np

from . import _page_cache as pages
from . import _reads
from ._batch_buffers import BatchBuffers
from ._format import MAGIC, corrupt, item_error
from ._format2 import FOOTER_SIZE, HEADER2, MAP_THRESHOLD
from ._index2 import Entry2, Index2, parse_footer
from ._safe_unpickler import make_loads

__all__ = ["VERIFY_POLICIES", "ByteSource", "Reader2", "open_index"]

VERIFY_POLICIES = ("all", "copied")
#: Arrays at least this large are read straight into the batch.
INTO_PLACE_BYTES = 64 << 10
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None


class ByteSource(Protocol):
    """Where the bytes of a file come from: a local file, a URL..."""

    name: str
    size: int

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[Any]: ...


async def open_index(
    source: ByteSource, head: bytes | None, loads: Callable[..., Any]
) -> Index2:
    """The index of a format 2 file read through ``source``: one read of the footer, one of
    the index region (``head`` is its first 64 bytes if already read, else None: the
    footer holds a copy)."""
    (foot,) = await source.read_ranges([(source.size - FOOTER_SIZE, FOOTER_SIZE)])
    footer = parse_footer(source.name, source.size, head, bytes(foot))
    (region,) = await source.read_ranges([(footer.index_offset, footer.region_length)])
    return Index2(source.name, footer, region, loads)


class _Entries:
    """Format 1's view of the index, key to entry, computed per lookup."""

    def __init__(self, index: Index2) -> None:
        self._index = index

    def __getitem__(self, key: Any) -> tuple[Any, ...]:
        self._index.guard()
        return self._index.locate(key)[:4]

    def __contains__(self, key: Any) -> bool:
        self._index.guard()
        try:
            self._index.locate(key)
        except KeyError:
            return False
        return True

    def items(self) -> list[tuple[Any, tuple[Any, ...]]]:
        index = self._index
        keys = index.keys()
        index.guard()
        return [(key, index.entry(n)[:4]) for n, key in enumerate(keys)]


class Reader2(_reads.FileReader):
    """The open state of a format 2 file: its mapped index, descriptor and read paths."""

    def __init__(
        self,
        path: str,
        *,
        use_mmap: bool,
        safe: bool,
        allow: Iterable[object],
        verify: str = "all",
    ) -> None:
        if verify not in VERIFY_POLICIES:
            raise ValueError(f"verify must be one of {VERIFY_POLICIES}, got {verify!r}")
        self.path = path
        self.use_mmap = use_mmap
        self.verify = verify
        self._loads = make_loads(safe, allow)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise corrupt(path, "it is not a regular file")
            self.size = info.st_size
            self.identity = (info.st_dev, info.st_ino)
            head = _reads._read_exactly(fd, min(self.size, HEADER2.size), 0, path)
            if not head.startswith(MAGIC):
                raise corrupt(path, "it does not start with a PickledDataset header")
            foot = b""
            if self.size >= HEADER2.size + FOOTER_SIZE:
                foot = _reads._read_exactly(fd, FOOTER_SIZE, self.size - FOOTER_SIZE, path)
            footer = parse_footer(path, self.size, head, foot)
            base = footer.index_offset - footer.index_offset % mmap.ALLOCATIONGRANULARITY
            length = footer.index_offset + footer.region_length - base
            self._index_map = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=base)
            self.index = Index2(
                path, footer, self._index_map, self._loads, footer.index_offset - base,
                guard=_weak_call(self.check_size),
            )
            self._handle = _reads._Handle(fd, use_mmap)
        except BaseException:
            os.close(fd)
            raise
        self.csum = footer.csum
        # ``entries[key]``: format 1's ``(offset, span, pickle_length, buffers)``.
        self.entries = _Entries(self.index)  # type: ignore[assignment]
        self.inline = _NOWAIT is not None
        self.private_maps = pages.AVAILABLE
        self.populate = pages.AVAILABLE
        self._generation = _reads._generation
        self._since_yield = 0
        self._checked: set[int] = set()  # offsets of items whose mapped arrays were hashed
        self._unmapped: dict[int, int | None] = {}  # offset: its checksum kept outside maps
        self._batch_buffers = BatchBuffers()

    def close(self) -> None:
        self._batch_buffers.close()
        super().close()

    # -- reads -------------------------------------------------------------

    def locate(self, keys: Sequence[Any]) -> list[Entry2]:
        """The entries of ``keys``; ``KeyError`` for a key not in the file."""
        self.check_size()
        return self.index.locate_many(keys)

    def check_size(self) -> None:
        """Refuse to touch the mapped index of a file that shrank since it was opened.

        Touching a map past the end of its file kills the process (SIGBUS);
        one ``fstat`` per batch (and per read of the keys or the context)
        rules that out unless the file shrinks during the read, which
        replacing files atomically never does.
        """
        size = self._current_size()
        if size is not None and size < self.size:
            raise corrupt(
                self.path, "it is shorter than when it was opened: its items now extend "
                "past the end of the file (was it truncated after being opened?)"
            )

    def _current_size(self) -> int | None:
        """The size of the open file now; None if it cannot be told (the map is then safe)."""
        handle: _reads._Handle | None = getattr(self, "_handle", None)
        if handle is None:  # still opening: the size was just read
            return None
        if not handle.closed:
            return os.fstat(handle.fd).st_size
        # Closed, while the map of the index lives on: the file is the one at the
        # path if that is still the same inode; else only the map holds it.
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_size if (info.st_dev, info.st_ino) == self.identity else None

    def _begin(
        self, keys: Sequence[Any]
    ) -> tuple[_reads._Handle, list[Any], Callable[[], None] | None]:
        entries = self.locate(keys)
        handle = self._live_handle()
        try:
            out: list[Any] = [None] * len(keys)
            cold = self._read_inline2(handle, keys, entries, out) if self.inline else range(
                len(keys)
            )
        except BaseException:
            handle.release()
            raise
        if not cold:
            return handle, out, None
        return handle, out, functools.partial(
            self._read_blocking2, handle, keys, entries, cold, out
        )

    def _bad(self, key: object) -> Exception:
        return corrupt(self.path, f"item {key!r} is damaged (checksum mismatch)")

    def _decode(self, key: object, entry: Entry2, view: memoryview) -> Any:
        """The item of ``entry`` from ``view``, its span's bytes, once checked."""
        _offset, _span, plen, buffers, crc = entry
        if self.csum(view) != crc:
            raise self._bad(key)
        try:
            if buffers is None:
                return self._loads(view)
            if len(buffers) == 1:  # the common case, without a list comprehension (W3a)
                (a, b), = buffers
                return self._loads(view[:plen], buffers=(view[a:b],))
            return self._loads(view[:plen], buffers=[view[a:b] for a, b in buffers])
        except Exception as exc:
            raise item_error(self.path, key, exc) from exc

    def _read_inline2(
        self, handle: _reads._Handle, keys: Sequence[Any], entries: list[Entry2], out: list[Any]
    ) -> list[int]:
        """Serve items whose pages are cached on the calling thread; return the others."""
        fd, preadv = handle.fd, os.preadv
        nowait: int = _NOWAIT  # type: ignore[assignment]
        cold: list[int] = []
        budget = _reads.INLINE_BYTES
        for index, entry in enumerate(entries):
            span = entry[1]
            if span >= budget:
                item = _reads._COLD
                if (
                    span >= MAP_THRESHOLD and self.private_maps and _has_mapped(entry[3])
                    and not self._hash_whole(entry)
                ):
                    item = self._large_inline2(fd, keys[index], entry)
                if item is _reads._COLD:
                    cold.append(index)
                else:
                    out[index] = item
                continue
            budget -= span
            # Room to start the span at the offset's remainder modulo 8, so that the
            # arrays, aligned in the file, are aligned in memory.
            skip = entry[0] % 8
            view = memoryview(bytearray(span + skip))[skip:]
            try:
                got = preadv(fd, (view,), entry[0], nowait)
            except BlockingIOError:
                got = -1
            except OSError as exc:
                if exc.errno in _reads._UNSUPPORTED:
                    self.inline = False
                    budget = 0
                got = -1
            if got != span:
                cold.append(index)
            else:
                out[index] = self._decode(keys[index], entry, view)
        return cold

    def _read_blocking2(
        self,
        handle: _reads._Handle,
        keys: Sequence[Any],
        entries: list[Entry2],
        todo: Iterable[int],
        out: list[Any],
    ) -> None:
        for index in todo:
            key, entry = keys[index], entries[index]
            offset, span, _plen, buffers, _crc = entry
            if span < MAP_THRESHOLD or not _has_mapped(buffers):
                skip = offset % 8
                view = memoryview(bytearray(span + skip))[skip:]
                self._fill(handle.fd, key, view, offset)
                out[index] = self._decode(key, entry, view)
            else:
                out[index] = self._mapped(handle, key, entry)

    def _fill(self, fd: int, key: object, view: memoryview, offset: int) -> None:
        done, size = 0, len(view)
        while done < size:
            got = os.preadv(fd, (view[done:],), offset + done)
            if not got:
                raise self._past_end(key)
            done += got

    def _hash_whole(self, entry: Entry2) -> bool:
        """Whether an item with mapped arrays is to be hashed whole at this read.

        The first read from this open dataset does so under ``verify="all"``,
        and under any policy in a file that keeps no checksum of the rest.
        """
        return entry[0] not in self._checked and (
            self.verify == "all" or not self.index.keeps_unmapped
        )

    def _unmapped_sum(self, offset: int) -> int | None:
        """The checksum kept of the item at ``offset`` outside its mapped buffers, if any."""
        if not self.index.keeps_unmapped:
            return None
        value = self._unmapped.get(offset)
        if value is None:
            self.check_size()  # the index is mapped (see check_size)
            value = self._unmapped[offset] = self.index.unmapped_sum(
                self.index.number_at(offset)
            )
        return value

    def _mapped(self, handle: _reads._Handle, key: object, entry: Entry2) -> Any:
        """An item with large arrays: they are mapped; the rest is read and checked."""
        offset, _span, plen, buffers, crc = entry
        assert buffers is not None
        hash_all = self._hash_whole(entry)
        unmapped = self._unmapped_sum(offset)
        csum, fd = self.csum, handle.fd
        value = rest = 0  # the checksums of the span, and of its bytes outside the maps
        loaded: list[Any] = []
        done = 0
        pickle_bytes = b""
        for a, b in buffers:
            gap = bytearray(a - done)
            self._fill(fd, key, memoryview(gap), offset + done)
            if not done:
                pickle_bytes = bytes(gap[:plen])
            value = csum(gap, value)
            rest = csum(gap, rest)
            if b - a >= MAP_THRESHOLD:
                part = self._map_buffer(handle, key, offset + a, b - a)
                if hash_all:
                    value = csum(part, value)
            else:
                small = bytearray(b - a)
                self._fill(fd, key, memoryview(small), offset + a)
                part = memoryview(small)
                value = csum(small, value)
                rest = csum(small, rest)
            loaded.append(part)
            done = b
        if unmapped is not None and rest != unmapped:
            raise self._bad(key)
        if hash_all:
            if value != crc:
                raise self._bad(key)
            self._checked.add(offset)
        try:
            return self._loads(pickle_bytes, buffers=loaded)
        except Exception as exc:
            raise item_error(self.path, key, exc) from exc

    def _large_inline2(self, fd: int, key: object, entry: Entry2) -> Any:
        """An item with mapped arrays whose pages are all cached, read on the calling
        thread (its arrays mapped, the rest checked if the file keeps its checksum);
        ``_COLD`` if a page is not cached."""
        offset, _span, plen, buffers, _crc = entry
        assert buffers is not None
        unmapped = self._unmapped_sum(offset)
        csum, preadv = self.csum, os.preadv
        nowait: int = _NOWAIT  # type: ignore[assignment]
        rest = 0
        loaded: list[Any] = []
        head = bytearray()
        done = 0
        try:
            for a, b in buffers:
                gap = bytearray(a - done)
                if preadv(fd, (gap,), offset + done, nowait) != len(gap):
                    return _reads._COLD
                if not done:
                    head = gap
                rest = csum(gap, rest)
                size = b - a
                if size >= MAP_THRESHOLD:
                    mapped = self._map_private(fd, key, offset + a, size, inline=True)
                    if mapped is None:
                        return _reads._COLD
                    loaded.append(mapped)
                else:
                    small = bytearray(size)
                    if preadv(fd, (small,), offset + a, nowait) != size:
                        return _reads._COLD
                    rest = csum(small, rest)
                    loaded.append(small)
                done = b
        except OSError:  # not cached, or failing: the worker thread will tell
            return _reads._COLD
        if unmapped is not None and rest != unmapped:
            raise self._bad(key)
        try:
            return self._loads(memoryview(head)[:plen], buffers=loaded)
        except Exception as exc:
            raise item_error(self.path, key, exc) from exc

    def _map_buffer(self, handle: _reads._Handle, key: object, start: int, size: int) -> Any:
        # The file's size now, not at open: a map past the end would SIGBUS when
        # hashed or touched (one fstat per array of 1 MiB or more).
        if start + size > min(self.size, os.fstat(handle.fd).st_size):
            raise self._past_end(key)
        if handle.view is not None:
            assert handle.map is not None
            self._populate(handle.map, key, start, size)
            return handle.view[start:start + size]
        mapped = None
        if self.private_maps:
            mapped = self._map_private(handle.fd, key, start, size)
        if mapped is None:
            buf = bytearray(size)
            self._fill(handle.fd, key, memoryview(buf), start)
            mapped = memoryview(buf)
        return mapped

    # -- batches read into place ---------------------------------------------

    def into_place_plan(self, entries: list[Entry2]) -> int | None:
        """The array size if every entry is one large array of the same size, else None."""
        size = None
        for _, span, _plen, buffers, _ in entries:
            if buffers is None or len(buffers) != 1:
                return None
            a, b = buffers[0]
            if b != span or b - a < INTO_PLACE_BYTES or (size is not None and b - a != size):
                return None
            size = b - a
        return size

    async def query_batch_into_place(
        self, keys: Sequence[Any], entries: list[Entry2], size: int
    ) -> Any:
        """Read each array straight into its row of the batch; None if the items are not
        plain arrays of one shape and dtype (the caller then collates as usual)."""
        handle = self._live_handle()
        try:
            return await anyio.to_thread.run_sync(
                self._into_place, handle, keys, entries, size
            )
        finally:
            handle.release()

    def _into_place(
        self, handle: _reads._Handle, keys: Sequence[Any], entries: list[Entry2], size: int
    ) -> Any:
        batch = self._batch_buffers.take(len(entries) * size)
        rows = memoryview(batch.data)
        csum, fd = self.csum, handle.fd
        first: Any = None
        for index, (key, entry) in enumerate(zip(keys, entries, strict=True)):
            offset, _span, plen, buffers, crc = entry
            assert buffers is not None
            a = buffers[0][0]
            head = bytearray(a)
            row = rows[index * size:(index + 1) * size]
            want = a + size
            got = os.preadv(fd, (head, row), offset)
            if got != want:  # rare: a short read; finish piece by piece
                if got < a:
                    self._fill(fd, key, memoryview(head)[got:], offset + got)
                    got = a
                self._fill(fd, key, row[got - a:], offset + got)
            if csum(row, csum(head)) != crc:
                raise self._bad(key)
            try:
                item = self._loads(memoryview(head)[:plen], buffers=(row,))
            except Exception as exc:
                raise item_error(self.path, key, exc) from exc
            if type(item) is not np.ndarray or item.nbytes != size or (
                item.__array_interface__["data"][0] != batch.ctypes.data + index * size
            ):
                return None
            if first is None:
                first = item
            elif item.dtype != first.dtype or item.shape != first.shape:
                return None
        return batch.view(first.dtype).reshape((len(entries), *first.shape))

    # -- checking a whole file ------------------------------------------------

    def verify_file(self, progress: Callable[[int], None] | None = None) -> None:
        """Check every byte: the index, then each item's span (blocking)."""
        self.index.check_all()
        fd = self._handle.fd
        chunk = 8 << 20
        for number in range(len(self.index)):
            self.check_size()  # the index is mapped: a file shrinking meanwhile would SIGBUS
            offset, span, _, buffers, crc = self.index.entry(number)
            unmapped = self.index.unmapped_sum(number) if _has_mapped(buffers) else None
            value = rest = 0  # the span's checksum, and that of its bytes outside the maps
            for start, stop, mapped in _segments(span, buffers):
                done = start
                while done < stop:
                    take = min(chunk, stop - done)
                    data = os.pread(fd, take, offset + done)
                    if len(data) != take:
                        raise corrupt(self.path, "it is truncated")
                    value = self.csum(data, value)
                    if not mapped:
                        rest = self.csum(data, rest)
                    done += take
            if value != crc or (unmapped is not None and rest != unmapped):
                raise self._bad(self.index.key_of(number))
            if progress is not None:
                progress(number)


def _weak_call(method: Callable[[], None]) -> Callable[[], None]:
    """``method``, held weakly: an index calling back its reader must not keep it alive
    (the reader's maps would outlive the dataset until a garbage collection)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        alive = ref()
        if alive is not None:
            alive()

    return call


def _has_mapped(buffers: tuple[tuple[int, int], ...] | None) -> bool:
    """Whether an item's buffers include one that is mapped rather than copied."""
    return buffers is not None and any(b - a >= MAP_THRESHOLD for a, b in buffers)


def _segments(
    span: int, buffers: tuple[tuple[int, int], ...] | None
) -> list[tuple[int, int, bool]]:
    """An item's span as ``(start, stop, mapped)`` pieces, in order."""
    if buffers is None:
        return [(0, span, False)]
    pieces = []
    done = 0
    for a, b in buffers:
        pieces += [(done, a, False), (a, b, b - a >= MAP_THRESHOLD)]
        done = b
    if done < span:
        pieces.append((done, span, False))
    return pieces
