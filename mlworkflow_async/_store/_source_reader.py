"""Reading a PickledDataset through a byte source: the reader of files behind URLs.

A byte source has a ``name``, a ``size`` and ``await read_ranges([(offset,
length), ...])`` (:class:`~._remote.RemoteSource` is one). Opening parses
the index with the same functions as a local file (format 2 through
:func:`~._reads2.open_index`: the footer, then the index region); each read
the parser asks for that the source does not already hold (its last bytes,
fetched when it opened) costs one request. Items of format 2 are checked
against their checksums before they are unpickled. A query reads all its items with one
``read_ranges`` call, so a batch travels in as few requests as its ranges
allow, then unpickles them (in a worker thread when the batch is large).

Arrays come back writable, copied out of the fetched bytes; with
``mmap=True`` (which needs the source's on-disk cache) arrays of 1 MiB or
more are read-only views of the cached bytes instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import anyio.to_thread

from ..exceptions import CorruptFileError, RemoteFileError
from ._format import HEADER_SIZE, MAGIC, MAP_THRESHOLD, Layout, check_header, corrupt, item_error
from ._format import parse as parse_index
from ._format2 import END_MAGIC, FOOTER_SIZE, HEADER2, VERSION2, footer_at
from ._index2 import Index2, MemoryIndex
from ._legacy import looks_legacy, parse_legacy
from ._reads import INLINE_BYTES
from ._reads2 import open_index
from ._remote import RemoteSource, open_source
from ._safe_unpickler import make_loads

__all__ = ["SourceReader", "open_blocking"]


class _Missing(BaseException):
    """The parser asked for bytes not fetched yet (a BaseException: parsers catch Exception)."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length


class SourceReader:
    """The open state of a PickledDataset read through a byte source.

    It has the interface :class:`~mlworkflow_async.PickledDataset` uses of
    a local file's reader: ``path``, ``size``, ``layout``, ``query``,
    ``close`` and ``closed``.
    """

    def __init__(
        self, source: RemoteSource, index: Index2 | MemoryIndex, *, use_mmap: bool, safe: bool,
        allow: Iterable[object],
    ) -> None:
        self.source = source
        self.path = source.name
        self.size = source.size
        self.index = index
        self._csum = getattr(index, "csum", None)  # format 2: every item has a checksum
        self.use_mmap = use_mmap
        self._loads = make_loads(safe, tuple(allow))
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    @classmethod
    async def open(
        cls, url: str, *, use_mmap: bool, safe: bool, allow: Iterable[object], **options: Any
    ) -> SourceReader:
        allow = tuple(allow)
        if use_mmap and options.get("cache_dir") is None:
            raise ValueError(
                f"mmap=True maps arrays from the local cache of {url}: pass cache_dir= too"
            )
        source = await open_source(url, **options)
        try:
            index = await _read_index(source, safe, allow)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await source.aclose()
            raise
        return cls(source, index, use_mmap=use_mmap, safe=safe, allow=allow)

    # -- reads ---------------------------------------------------------------

    async def query(self, keys: Sequence[Any]) -> list[Any]:
        """The items of ``keys``, in order, from one ``read_ranges`` call."""
        locate = self.index.locate
        rows = []
        for key in keys:
            try:
                rows.append(locate(key))
            except Exception:
                raise self._unknown(key) from None
        self._acquire()
        try:
            mapped: list[memoryview] = []
            if self.use_mmap:
                mapped = await self._map_large(rows)
            ranges = [(offset, plen if mapped and mapped[i] is not None else span)
                      for i, (offset, span, plen, _, _) in enumerate(rows)]
            try:
                blobs = await self.source.read_ranges(ranges)
            except RemoteFileError as exc:
                raise self._naming(exc, keys, ranges) from exc
            if sum(length for _, length in ranges) < INLINE_BYTES:
                return self._decode(keys, rows, blobs, mapped)
            return await anyio.to_thread.run_sync(self._decode, keys, rows, blobs, mapped)
        finally:
            self._release()

    async def _map_large(self, rows: Sequence[Any]) -> list[Any]:
        """Views of the cached bytes of items with large buffers (None for the others)."""
        large = [i for i, (_, span, _, buffers, _) in enumerate(rows)
                 if buffers is not None and span >= MAP_THRESHOLD]
        out: list[Any] = [None] * len(rows)
        if large:
            views = await self.source.map_ranges([rows[i][:2] for i in large])
            for i, view in zip(large, views, strict=True):
                out[i] = view
        return out if large else []

    def _decode(
        self, keys: Sequence[Any], rows: Sequence[Any], blobs: Sequence[Any], mapped: list[Any]
    ) -> list[Any]:
        loads, csum = self._loads, self._csum
        out = []
        for i, (key, row, blob) in enumerate(zip(keys, rows, blobs, strict=True)):
            _, span, plen, buffers, crc = row
            whole = mapped[i] if mapped and mapped[i] is not None else None
            if crc is not None and csum is not None:
                checked = whole if whole is not None else memoryview(blob)[:span]
                if csum(checked) != crc:
                    raise corrupt(self.path, f"item {key!r} is damaged (checksum mismatch)")
            try:
                if buffers is None:
                    out.append(loads(blob))
                    continue
                if whole is not None:
                    parts = [whole[a:b] for a, b in buffers]
                else:
                    view = memoryview(blob)
                    parts = [bytearray(view[a:b]) for a, b in buffers]  # writable arrays
                out.append(loads(memoryview(blob)[:plen], buffers=parts))
            except Exception as exc:
                raise item_error(self.path, key, exc) from exc
        return out

    def _unknown(self, key: object) -> KeyError:
        try:
            hash(key)
        except TypeError:
            return KeyError(f"{key!r} (unhashable) is not a key of {self.path}")
        return KeyError(f"{key!r} is not a key of the PickledDataset {self.path}")

    def _naming(
        self, exc: RemoteFileError, keys: Sequence[Any], ranges: Sequence[tuple[int, int]]
    ) -> RemoteFileError:
        """``exc`` with the keys of the items it failed to read added to its message."""
        failed = set(getattr(exc, "ranges", ()) or ())
        named = [key for key, r in zip(keys, ranges, strict=True) if r in failed]
        if not named:
            return exc
        shown = ", ".join(repr(k) for k in named[:5]) + (", ..." if len(named) > 5 else "")
        which = "item" if len(named) == 1 else "items"
        error = type(exc)(f"{exc} (reading {which} {shown})", exc.path)
        error.ranges = exc.ranges  # type: ignore[attr-defined]
        return error

    # -- life cycle ------------------------------------------------------------

    def _acquire(self) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"the PickledDataset of {self.path} is closed")
            self._users += 1

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            dispose = self._closed and not self._users
        if dispose:
            self.source.close()

    def close(self) -> None:
        """Close the source once the reads in progress end."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dispose = not self._users
        if dispose:
            self.source.close()

    @property
    def closed(self) -> bool:
        return self._closed


def open_blocking(url: str, **arguments: Any) -> SourceReader:
    """:meth:`SourceReader.open` for blocking code, run on the blocking view's event loop."""
    from .._core._portal import call

    async def opening() -> SourceReader:
        return await SourceReader.open(url, **arguments)

    return call(opening)


class _Format2(BaseException):
    """The file is of format 2, whose index is read by :func:`open_index`."""

    def __init__(self, head: bytes) -> None:
        self.head = head


async def _format2_from_tail(source: RemoteSource, loads: Any) -> Index2 | None:
    """A format 2 index from the bytes fetched at open, and one request for its region.

    The footer holds a copy of the header, so the file's first bytes are not
    needed (they are compared with it when they came with the last bytes).
    None when the last bytes are not a format 2 footer: the caller then
    reads the header and decides.
    """
    size = source.size
    foot = source.peek(size - FOOTER_SIZE, FOOTER_SIZE) if size >= FOOTER_SIZE else None
    if foot is None or not foot.endswith(END_MAGIC):
        return None
    copy = foot[footer_at(foot):]  # the header's copy starts the footer
    if not copy.startswith(MAGIC) or int.from_bytes(copy[8:12], "little") != VERSION2:
        return None
    try:
        return await open_index(source, source.peek(0, HEADER2.size), loads)
    except CorruptFileError:
        return None  # bytes that only looked like a footer: read the header


async def _read_index(
    source: RemoteSource, safe: bool, allow: tuple[object, ...]
) -> Index2 | MemoryIndex:
    """Parse the index, fetching each range the parser asks for that is not at hand."""
    known: dict[tuple[int, int], bytes] = {}
    loads = make_loads(safe, allow)
    path, size = source.name, source.size

    def read(offset: int, length: int) -> bytes:
        data = known.get((offset, length))
        if data is None:
            data = source.peek(offset, length)
        if data is None:
            raise _Missing(offset, length)
        return data

    def parse() -> Layout:
        if size == 0:
            raise corrupt(path, "the file is empty")
        head = read(0, min(size, HEADER_SIZE))
        if head.startswith(MAGIC):
            if len(head) >= 12 and int.from_bytes(head[8:12], "little") == VERSION2:
                raise _Format2(head)
            check_header(head, path)
            return parse_index(read, size, path, loads)
        if MAGIC.startswith(head):
            raise corrupt(path, "it is truncated inside its header")
        if looks_legacy(head):
            return parse_legacy(read, size, path, safe, allow)
        raise corrupt(
            path, "it does not start with a PickledDataset header (of this library or of "
            "the original mlworkflow)"
        )

    index = await _format2_from_tail(source, loads)
    if index is not None:
        return index
    while True:
        try:
            return MemoryIndex(await anyio.to_thread.run_sync(parse))
        except _Format2 as found:
            # The footer, then the index region: in the last bytes, or one request.
            return await open_index(source, found.head, loads)
        except _Missing as missing:
            wanted = (missing.offset, min(missing.length, size - missing.offset))
            if wanted[1] < 0 or wanted[1] != missing.length:
                raise corrupt(path, "it is truncated") from None
            (data,) = await source.read_ranges([wanted])
            known[wanted] = bytes(data)
