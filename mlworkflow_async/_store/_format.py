"""Encoding and decoding of the PickledDataset file format (version 1).

The layout is described in the docstring of :mod:`mlworkflow_async._store._pickled`.
Everything here is pure computation over bytes; reading and writing files is
left to the callers, so that it can happen off the event loop.
"""

from __future__ import annotations

import pickle
import re
import struct
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import numpy as np

from ..exceptions import (
    CorruptFileError,
    KeyClassNotFoundError,
    PickledFileError,
    UnpicklableItemError,
    UnsafePickleError,
    UnsupportedVersionError,
)
from ._safe_unpickler import ForbiddenGlobal, Loads, Refused

MAGIC = b"\x89MLWDS\r\n"
END_MAGIC = b"MLWDSEND"
VERSION = 1
HEADER = struct.Struct("<8sII48s")  # magic, version, flags, reserved (zeros)
TRAILER = struct.Struct("<QQI4x8s")  # index offset, index length, index crc32, end magic
HEADER_SIZE = HEADER.size
TRAILER_SIZE = TRAILER.size
PROTOCOL = 5
#: Out-of-band buffers start on this boundary, so arrays are aligned in memory.
ALIGN = 64
#: Buffers at least this large start on a page boundary and are mapped, not copied.
MAP_THRESHOLD = 1 << 20
PAGE = 4096
_ZEROS = memoryview(bytes(PAGE))

#: No offset or length in a file may reach this (it would not fit an int64).
MAX_FIELD = 1 << 62

#: ``(offset, span, pickle_length, buffers)``: the item's bytes are
#: ``[offset, offset + span)``; its pickle is the first ``pickle_length`` of
#: them and ``buffers`` holds the ``(start, stop)`` of each out-of-band buffer
#: relative to ``offset``, or is ``None`` when there are none.
Entry = tuple[int, int, int, "tuple[tuple[int, int], ...] | None"]
Read = Callable[[int, int], bytes]


class Layout(NamedTuple):
    """What opening a file yields: its format version (0: the original's) and index."""

    version: int
    keys: tuple[Any, ...]
    entries: dict[Any, Entry]
    context: dict[str, Any] | None


def corrupt(path: str, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is not a readable PickledDataset file: {what}", path)


def item_error(path: str, key: object, exc: BaseException) -> CorruptFileError | UnsafePickleError:
    """The error to raise when item ``key`` cannot be unpickled."""
    if isinstance(exc, ForbiddenGlobal):
        return UnsafePickleError(
            f"item {key!r} of {path} wants to load {exc.module}.{exc.name}, which safe "
            f"mode does not allow; pass it in allow=(...) if you trust it",
            path,
        )
    if isinstance(exc, Refused):
        return UnsafePickleError(
            f"item {key!r} of {path} is refused in safe mode: {exc}", path
        )
    return CorruptFileError(
        f"item {key!r} of {path} cannot be unpickled{_hint(exc)}: {type(exc).__name__}: {exc}",
        path,
    )


def index_error(path: str, exc: Exception) -> PickledFileError:
    """The error to raise when the index (keys and context) cannot be unpickled."""
    if isinstance(exc, ForbiddenGlobal):
        return UnsafePickleError(
            f"the keys or context of {path} want to load {exc.module}.{exc.name}, which "
            f"safe mode does not allow; pass it in allow=(...) if you trust it",
            path,
        )
    if isinstance(exc, Refused):
        return UnsafePickleError(
            f"the keys or context of {path} are refused in safe mode: {exc}", path
        )
    missing = _missing_class(exc)
    if missing is not None:
        return KeyClassNotFoundError(
            f"the keys or context of {path} need {missing}, which cannot be imported here "
            f"({type(exc).__name__}: {exc}): install or import the package defining it",
            path,
        )
    return corrupt(
        path, f"its index cannot be unpickled{_hint(exc)}: {type(exc).__name__}: {exc}"
    )


def _missing_class(exc: BaseException) -> str | None:
    """What a pickle wanted to import, when ``exc`` says it could not be found."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"the module {exc.name!r}"
    if isinstance(exc, AttributeError):
        module = getattr(exc, "obj", None)
        if isinstance(module, type(pickle)):
            return f"{module.__name__}.{exc.name}"
        # The unpickler's own message: Can't get attribute 'X' on <module 'm' from ...>
        found = _NO_ATTRIBUTE.match(str(exc))
        if found:
            return f"{found[2]}.{found[1]}"
    return None


_NO_ATTRIBUTE = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def _hint(exc: BaseException) -> str:
    if isinstance(exc, (ImportError, AttributeError)):
        return " (is the module defining its classes importable here?)"
    return ""


# -- writing -----------------------------------------------------------------

_DTYPE_SPELLING: dict[np.dtype[Any], str | None] = {}


def _simple_dtype(dtype: np.dtype[Any]) -> str | None:
    """``dtype.str`` when it rebuilds ``dtype`` exactly, else None."""
    try:
        return _DTYPE_SPELLING[dtype]
    except KeyError:
        pass
    spelled: str | None = dtype.str
    if (
        dtype.names is not None
        or dtype.subdtype is not None
        or dtype.hasobject
        or dtype.metadata
        or np.dtype(dtype.str) != dtype
    ):
        spelled = None
    _DTYPE_SPELLING[dtype] = spelled
    return spelled


def _frombuffer_function() -> Any:
    core: Any = getattr(np, "_core", None)
    if core is None or not hasattr(core, "numeric"):  # numpy 1.x
        import numpy.core as core
    return core.numeric._frombuffer


_FROMBUFFER = _frombuffer_function()


class ItemPickler(pickle.Pickler):
    """A protocol 5 pickler sending every contiguous numpy array out-of-band.

    Plain C-contiguous arrays are rebuilt by ``numpy.frombuffer`` (1-d) or
    numpy's own ``_frombuffer``, with the dtype spelled as a string: the
    pickle stays readable without this library, and is quicker to write and
    read than numpy's own reduction. Other arrays are left to numpy.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.flags.c_contiguous:
            spelled = _simple_dtype(obj.dtype)
            if spelled is not None:
                try:
                    # Older numpy stubs do not type arrays as buffers.
                    buffer = pickle.PickleBuffer(cast(Any, obj))
                except (BufferError, ValueError, TypeError):  # e.g. datetime64
                    _DTYPE_SPELLING[obj.dtype] = None
                    return NotImplemented
                if obj.ndim == 1:
                    return np.frombuffer, (buffer, spelled)
                return _FROMBUFFER, (buffer, spelled, obj.shape, "C")
        return NotImplemented


class _Target:
    """A file-like object for the pickler: it appends to a bytearray."""

    __slots__ = ("write",)

    def __init__(self, blob: bytearray) -> None:
        self.write = blob.extend


#: Out-of-band buffers smaller than this are copied into the output in one go.
_COPY_LIMIT = 64 << 10


class Encoder:
    """Turns ``(key, item)`` chunks into the bytes to append, and the final index.

    Not thread-safe, but not bound to a thread: chunks are encoded one after
    the other, each possibly in a different worker thread.
    """

    def __init__(self, path: str, start: int = HEADER_SIZE) -> None:
        self.path = path
        self.position = start
        self.count = 0
        self._keys: list[Any] = []
        self._seen: set[Any] = set()
        # Packed chunk by chunk, so that finishing does not convert one huge list.
        self._table: list[bytes] = []
        self._buffers: list[bytes] = []

    def encode(self, keys: Sequence[Any], items: Sequence[Any]) -> list[Any]:
        """Pickle ``items``; return the buffers to write, in order.

        Pickles, padding and small out-of-band buffers are gathered in one
        bytearray; large buffers are written from the arrays' own memory.
        Few objects stay alive meanwhile, which spares the cyclic garbage
        collector (whose full passes would pause the event loop too).
        """
        blob = bytearray()
        target = _Target(blob)
        oob: list[pickle.PickleBuffer] = []
        pickler = ItemPickler(target, PROTOCOL, buffer_callback=oob.append)
        large: list[tuple[int, memoryview]] = []  # (where in blob, buffer)
        base = self.position
        extra = 0  # bytes of the large buffers so far
        table: list[int] = []
        buffer_rows: list[int] = []
        seen = self._seen
        for key, item in zip(keys, items, strict=True):
            try:
                if key in seen:
                    raise ValueError(
                        f"key {key!r} appears twice: the keys of a PickledDataset are unique"
                    )
                seen.add(key)
            except TypeError:
                raise TypeError(f"keys must be hashable, got {key!r}") from None
            start = len(blob)
            try:
                pickler.dump(item)
            except Exception as exc:
                raise UnpicklableItemError(
                    f"item {key!r} cannot be pickled into {self.path}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            pickler.clear_memo()
            plen = len(blob) - start
            first = base + extra + start
            if not oob:
                table += (first, plen, plen, 0)
                continue
            pad = -first % ALIGN
            if pad:  # the item starts aligned, and so do its buffers in memory
                blob[start:start] = _ZEROS[:pad]
                first += pad
            for buffer in oob:
                raw = buffer.raw()
                size = raw.nbytes
                pos = base + extra + len(blob)
                pad = -pos % (PAGE if size >= MAP_THRESHOLD else ALIGN)
                blob += _ZEROS[:pad]
                buffer_rows += (pos + pad - first, pos + pad - first + size)
                if size >= _COPY_LIMIT:
                    large.append((len(blob), raw))
                    extra += size
                else:
                    blob += raw
            table += (first, base + extra + len(blob) - first, plen, len(oob))
            oob.clear()
        self.position = base + extra + len(blob)
        self._table.append(np.asarray(table, dtype="<u8").tobytes())
        self._buffers.append(np.asarray(buffer_rows, dtype="<u8").tobytes())
        self._keys += keys
        self.count += len(table) // 4
        if not large:
            return [blob]
        view = memoryview(blob)
        parts: list[Any] = []
        done = 0
        for at, raw in large:
            parts += (view[done:at], raw)
            done = at
        parts.append(view[done:])
        return parts

    def finish(self, context: Mapping[str, Any] | None) -> bytes:
        """The index and trailer that end the file."""
        index = {
            "keys": self._keys,
            "table": b"".join(self._table),
            "buffers": b"".join(self._buffers),
            "context": dict(context) if context else None,
        }
        try:
            blob = pickle.dumps(index, PROTOCOL)
        except Exception as exc:
            raise UnpicklableItemError(
                f"the keys or the context of the dataset cannot be pickled into "
                f"{self.path}: {type(exc).__name__}: {exc}"
            ) from exc
        trailer = TRAILER.pack(self.position, len(blob), zlib.crc32(blob), END_MAGIC)
        return blob + trailer


def header() -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, bytes(48))


# -- reading -----------------------------------------------------------------


def check_header(head: bytes, path: str) -> int:
    """The format version of a file starting with ``head``, which must begin with MAGIC."""
    if len(head) < HEADER_SIZE:
        raise corrupt(path, "it is truncated right after its header")
    _, version, flags, reserved = HEADER.unpack_from(head)
    if version > VERSION:
        raise UnsupportedVersionError(
            f"{path} was written by a newer version of mlworkflow-async (file format "
            f"{version}; this version reads formats up to {VERSION}): upgrade the library",
            path,
        )
    if version < 1:
        raise corrupt(path, f"its header announces format version {version}")
    check_flags(path, flags, reserved)
    return int(version)


def check_flags(path: str, flags: int, reserved: bytes) -> None:
    """Refuse header flags or reserved bytes this version does not know (any format)."""
    if flags or reserved.strip(b"\0"):
        # A newer writer may use them; reading as if they were not set could be wrong.
        raise UnsupportedVersionError(
            f"{path} sets header flags this version does not know (flags {flags:#x}, "
            f"reserved bytes {reserved.hex() if reserved.strip(bytes(1)) else 'zero'}): "
            f"it was written by a newer version of mlworkflow-async, or is damaged",
            path,
        )


def parse(read: Read, size: int, path: str, loads: Loads) -> Layout:
    """Read and validate the index of a version 1 file of ``size`` bytes."""
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise corrupt(path, "it is truncated (the writer may have been interrupted)")
    index_offset, index_length, crc, end = TRAILER.unpack(read(size - TRAILER_SIZE, TRAILER_SIZE))
    if index_offset >= MAX_FIELD or index_length >= MAX_FIELD:
        raise corrupt(
            path, f"its trailer is damaged (index offset {index_offset}, length {index_length})"
        )
    if end != END_MAGIC:
        raise corrupt(
            path, "its end-of-file marker is missing: it is truncated, or its writer was "
            "interrupted"
        )
    if index_offset < HEADER_SIZE or index_offset + index_length != size - TRAILER_SIZE:
        raise corrupt(
            path, f"its index lies outside the file (offset {index_offset}, length "
            f"{index_length}, file size {size})"
        )
    blob = read(index_offset, index_length)
    if zlib.crc32(blob) != crc:
        raise corrupt(path, "its index is damaged (checksum mismatch)")
    try:
        index = loads(blob)
    except Exception as exc:
        raise index_error(path, exc) from exc
    return _entries_from_index(index, index_offset, path)


def _entries_from_index(index: Any, data_end: int, path: str) -> Layout:
    try:
        keys = index["keys"]
        table = np.frombuffer(index["table"], dtype="<u8").reshape(-1, 4)
        rows = np.frombuffer(index["buffers"], dtype="<u8").reshape(-1, 2)
        context = index["context"]
        # Checked before the keys are copied: a list is as long as its pickle allows.
        if type(keys) is not list or len(keys) != len(table):
            raise ValueError(
                f"{len(table)} table rows for {len(keys) if type(keys) is list else 'no'} keys"
            )
        keys = tuple(keys)
    except Exception as exc:
        raise corrupt(path, f"its index is malformed ({type(exc).__name__}: {exc})") from exc
    n = len(keys)
    if context is not None and not isinstance(context, dict):
        raise corrupt(path, "its index is malformed (the context is not a dict)")
    if (n and (table >= MAX_FIELD).any()) or (len(rows) and (rows >= MAX_FIELD).any()):
        raise corrupt(path, "its index holds an offset or a length too large for any file")
    offsets, spans, plens, counts = (table[:, i].astype(np.int64) for i in range(4))
    if n and (
        (table[:, 3] > len(rows)).any()
        or np.min(offsets) < HEADER_SIZE
        or (table[:, 0] > data_end).any()
        or (table[:, 1] > data_end).any()
        or (offsets + spans > data_end).any()
        or (plens > spans).any()
        or int(counts.sum()) != len(rows)
    ):
        bad = _first_bad(keys, offsets, spans, plens, data_end)
        raise corrupt(path, f"its index places item {bad!r} outside the data region")
    if len(rows):
        starts, stops = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
        owner_span = np.repeat(spans, counts)
        owner_plen = np.repeat(plens, counts)
        if (
            (rows > data_end).any()
            or (starts < owner_plen).any()
            or (stops < starts).any()
            or (stops > owner_span).any()
        ):
            raise corrupt(path, "its index places a buffer outside its item")
    # Column by column: a 2-D tolist() is one long call that holds the GIL
    # (tens of ms for a large index, opened in a worker thread), stalling the
    # event loop; a Python loop lets the interpreter switch threads.
    columns = [table[:, i].tolist() for i in range(4)]
    buffer_starts, buffer_stops = rows[:, 0].tolist(), rows[:, 1].tolist()
    entries: dict[Hashable, Entry] = {}
    at = 0
    try:
        for key, offset, span, plen, count in zip(keys, *columns, strict=True):
            if count:
                stop = at + count
                entries[key] = (
                    offset, span, plen,
                    tuple(zip(buffer_starts[at:stop], buffer_stops[at:stop], strict=True)),
                )
                at = stop
            else:
                entries[key] = (offset, span, plen, None)
    except TypeError as exc:  # an unhashable key
        raise corrupt(path, f"its index is malformed ({exc})") from exc
    if len(entries) != n:
        raise corrupt(path, "its index lists a key twice")
    return Layout(VERSION, keys, entries, context)


def _first_bad(
    keys: tuple[Any, ...], offsets: Any, spans: Any, plens: Any, data_end: int
) -> object:
    for key, offset, span, plen in zip(keys, offsets, spans, plens, strict=True):
        if offset < HEADER_SIZE or offset + span > data_end or plen > span:
            return key
    return "?"
