"""Reading files written by the original ``mlworkflow`` library's ``PickledDataset``.

Those files hold, one after the other: a pickled int (the offset of the
index, XOR ``1 << 65``; it stays ``1 << 65`` until the writer finishes), each
item pickled on its own, the pickled index ``{key: offset}``, and optionally a
pickled dict of context metadata. Items follow each other in index order, so
each one ends where the next begins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ._format import Entry, Layout, Read, corrupt, index_error
from ._safe_unpickler import load_consecutive, load_plain_int

__all__ = ["looks_legacy", "parse_legacy"]

_MARK = 1 << 65


def looks_legacy(head: bytes) -> bool:
    """True when ``head`` starts like a pickle (a PROTO opcode of protocol 2 to 5)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def parse_legacy(
    read: Read, size: int, path: str, safe: bool, allow: Iterable[object]
) -> Layout:
    """Read and validate the index of an original ``mlworkflow`` file."""
    try:
        value, data_start = load_plain_int(read(0, min(size, 64)))
    except Exception:
        raise corrupt(path, "it does not start with a PickledDataset header") from None
    if value == _MARK:
        raise corrupt(path, "its writer did not finish (the index location was never written)")
    location = value ^ _MARK
    if not data_start <= location < size:
        raise corrupt(
            path, f"its index location ({location}) lies outside the file (size {size})"
        )
    try:
        found = load_consecutive(read(location, size - location), safe, allow, limit=2)
    except Exception as exc:
        raise index_error(path, exc) from exc
    index = found[0] if found else None
    if not isinstance(index, dict):
        raise corrupt(path, "its index is not a dict of key offsets")
    context: dict[str, Any] | None = None
    if len(found) > 1:
        if not isinstance(found[1], Mapping):
            raise corrupt(path, "the metadata after its index is not a mapping")
        context = dict(found[1])
    return Layout(0, tuple(index), _entries(index, data_start, location, path), context)


def _entries(index: dict[Any, Any], start: int, stop: int, path: str) -> dict[Any, Entry]:
    by_offset = sorted(index.items(), key=lambda pair: _offset(pair, path))
    entries: dict[Any, Entry] = {}
    for position, (key, offset) in enumerate(by_offset):
        end = by_offset[position + 1][1] if position + 1 < len(by_offset) else stop
        if not start <= offset < end:
            raise corrupt(path, f"its index places item {key!r} outside the data region")
        entries[key] = (offset, end - offset, end - offset, None)
    return entries


def _offset(pair: tuple[Any, Any], path: str) -> int:
    offset = pair[1]
    if type(offset) is not int:
        raise corrupt(path, f"its index gives item {pair[0]!r} a non-integer offset")
    return offset
