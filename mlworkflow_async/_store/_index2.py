"""The index of a format 2 file, used in place: footer checks, hash lookups, lazy keys.

The index region (see :mod:`mlworkflow_async._store._format2`) is a mapped
(or, for a remote file, downloaded) buffer. Opening checks the header, the
footer and the table of block checksums; each 4096-byte block of the index
is checked the first time a lookup touches it (all of them at once when
the index is small), so a damaged index raises
:class:`~mlworkflow_async.exceptions.CorruptFileError` instead of leading
a read astray. A file whose footer declares its keys a range of ints
(``KEYS_RANGE``) is looked up by subtraction: one block of entries a key.

Format 0 and 1 files keep their index in a dict built at open
(:class:`MemoryIndex`); both kinds answer ``locate(key)``, ``keys()``,
``len()`` and ``context``.
"""

from __future__ import annotations

import itertools
import pickle
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..exceptions import CorruptFileError, UnsupportedVersionError
from ._checksum import NAMES, Checksum, checksum_function
from ._format import MAGIC, Layout, check_flags, corrupt, index_error
from ._format2 import (
    ALIGN,
    END_MAGIC,
    ENTRY,
    EXT,
    FIRST_FOOTER,
    FIRST_FOOTER_SIZE,
    FOOTER,
    FOOTER_SIZE,
    HEADER2,
    KEYS_RANGE,
    KNOWN_FLAGS,
    LOW,
    PAGE,
    TAG_SHIFT,
    UNMAPPED_SUMS,
    VERSION2,
    capacity,
    footer_at,
    key_bytes,
    spell_int_keys,
)
from ._spelled_keys import int_key_bytes

__all__ = ["Entry2", "Footer", "Index2", "MemoryIndex", "parse_footer"]

#: ``(offset, span, pickle_length, buffers, checksum)``, as format 1's entry
#: plus the checksum of the span (None for files without checksums).
Entry2 = tuple[int, int, int, "tuple[tuple[int, int], ...] | None", "int | None"]
#: Indexes at most this large are checked whole at open.
EAGER_BYTES = 1 << 20
_GOLDEN = 0x9E3779B1
_MASK32 = 0xFFFFFFFF
_ENTRY_AND_NEXT = struct.Struct("<QIIQ")
_ROW = struct.Struct("<QQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Footer(NamedTuple):
    """What the header and footer say, with the place of each part of the index region.

    Offsets of parts are relative to the start of the region.
    """

    algorithm: int
    csum: Checksum
    index_offset: int
    item_count: int
    table_length: int
    ext_count: int
    row_count: int
    keys_length: int
    context_length: int
    #: The first key of a file of :data:`KEYS_RANGE` (its keys are ``first, first + 1,
    #: ...``); None for other files.
    first: int | None
    blocks_crc: int
    width: int
    block: int
    key_offsets: int
    table: int
    prints: int
    ext: int
    rows: int
    keys: int
    context: int
    #: Where part 9 (the checksums outside mapped buffers) starts; None if absent.
    unmapped: int | None
    blocks: int
    block_count: int
    region_length: int


def parse_footer(name: str, size: int, head: bytes | None, foot: bytes) -> Footer:
    """Check the header and footer of a format 2 file of ``size`` bytes.

    ``head`` is the file's first 64 bytes, or None where reading them would
    cost another request: the footer's copy of the header stands in.
    """
    if size < HEADER2.size + FIRST_FOOTER_SIZE or len(foot) < FOOTER_SIZE or (
        head is not None and len(head) < HEADER2.size
    ):
        raise corrupt(
            name, "its end-of-file marker is missing: it is truncated, or its writer was "
            "interrupted"
        )
    start = footer_at(foot)
    first_layout = start > 0
    foot = foot[start:]
    layout, footer_size = (
        (FIRST_FOOTER, FIRST_FOOTER_SIZE) if first_layout else (FOOTER, FOOTER_SIZE)
    )
    fields = layout.unpack_from(foot, HEADER2.size)
    if fields[-1] != END_MAGIC:
        raise corrupt(
            name, "its end-of-file marker is missing: it is truncated, or its writer was "
            "interrupted"
        )
    copy = bytes(foot[:HEADER2.size])
    if head is None:
        head = copy
    magic, version, flags, algorithm, head_crc = HEADER2.unpack_from(head)
    if magic != MAGIC or version != VERSION2:
        raise corrupt(name, "its header is not that of format 2")
    csum = checksum_function(algorithm)
    if csum is None:
        known = NAMES.get(algorithm)
        if known is None:
            raise corrupt(name, f"its header names an unknown checksum ({algorithm})")
        raise UnsupportedVersionError(
            f"{name} is checked with {known}, which needs the crc32c package: "
            f"pip install crc32c", name
        )
    if csum(head[: HEADER2.size - 4]) != head_crc:
        raise corrupt(name, "its header is damaged (checksum mismatch)")
    if csum(foot[: footer_size - 12]) != fields[-2]:
        raise corrupt(name, "its footer is damaged (checksum mismatch)")
    if bytes(head[:HEADER2.size]) != copy:
        raise corrupt(name, "its header and the copy in its footer differ")
    # The reserved bytes lie between the algorithm field and the checksum.
    check_flags(name, flags, bytes(head[20:HEADER2.size - 4]))
    if first_layout:
        fields = (*fields[:7], 0, 0, *fields[7:])
    (index_offset, count, table_length, ext_count, row_count, keys_length, context_length,
     first, footer_flags, blocks_crc, width, block, _, _) = fields
    if width not in (4, 8) or block < 512 or block & (block - 1):
        raise corrupt(name, f"its footer is malformed (width {width}, block {block})")
    if footer_flags & ~KNOWN_FLAGS:
        raise UnsupportedVersionError(
            f"{name} sets footer flags this version does not know ({footer_flags:#x}): it "
            f"was written by a newer version of mlworkflow-async", name
        )
    if not footer_flags & KEYS_RANGE:
        first = None
    elif not count or first < -0x80000000 or first + count > 0x80000000:
        raise corrupt(name, f"its footer is malformed (keys from {first}, {count} items)")
    key_offsets = 16 * count
    table = key_offsets + (count + 1) * width
    prints = table + table_length * width
    ext = prints + table_length
    rows = ext + 24 * ext_count
    keys = rows + 16 * row_count
    context = keys + keys_length
    unmapped = context + context_length
    blocks = unmapped + (4 * count if footer_flags & UNMAPPED_SUMS else 0)
    block_count = -(-blocks // block)
    region_length = blocks + 4 * block_count
    if (
        index_offset < HEADER2.size
        or index_offset + region_length + footer_size != size
        or table_length < min(1, count) or table_length > 2 * capacity(count) + 1
    ):
        raise corrupt(
            name, f"its footer does not fit its size ({size} bytes): it is truncated or "
            f"damaged"
        )
    return Footer(
        algorithm, csum, index_offset, count, table_length, ext_count, row_count,
        keys_length, context_length, first, blocks_crc, width, block, key_offsets, table,
        prints, ext, rows, keys, context, unmapped if footer_flags & UNMAPPED_SUMS else None,
        blocks, block_count, region_length,
    )


class Index2:
    """The index of a format 2 file, read in place from its region.

    ``region`` is any buffer holding the bytes of the index region from
    offset ``base`` (a map of the file's tail, whose start must be aligned;
    slicing an ``mmap`` or ``bytes`` gives ``bytes``, quick to compare).

    ``guard``, when the region is a map, raises
    :class:`~mlworkflow_async.exceptions.CorruptFileError` if the file
    shrank under it: touching a map past the end of its file kills the
    process (SIGBUS). The methods that read much of the region whole
    (:meth:`keys`, :attr:`context`, :meth:`key_of`, :meth:`check_all`) call
    it first; the lookups leave it to their caller, once per batch.
    """

    version = VERSION2

    def __init__(
        self,
        name: str,
        footer: Footer,
        region: Any,
        loads: Callable[..., Any],
        base: int = 0,
        guard: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._guard = guard
        self.footer = footer
        self.csum = footer.csum
        self.item_count = footer.item_count
        self.data_end = footer.index_offset
        self._buffer = region
        self._region = memoryview(region)[base:base + footer.region_length]
        self._loads = loads
        f = footer
        region = self._region
        # Absolute places in the buffer and plain ints, for the lookup paths.
        self._entries_at = base
        self._offsets_at = base + f.key_offsets
        self._table_at = base + f.table
        self._prints_at = base + f.prints
        self._keys_at = base + f.keys
        self._table_length = f.table_length
        self._width = f.width
        self._keys_length = f.keys_length
        sums = region[f.blocks:f.blocks + 4 * f.block_count]
        if self.csum(sums) != f.blocks_crc:
            raise corrupt(name, "its index is damaged (block checksums mismatch)")
        self._sums = sums
        self._verified = bytearray(f.block_count)
        self._unverified = f.block_count
        self._counting = threading.Lock()
        self._shift = f.block.bit_length() - 1
        self._lazy = True
        if f.blocks <= EAGER_BYTES:
            self.check(0, f.blocks)
            self._lazy = False
        self._slot = struct.Struct("<I" if f.width == 4 else "<Q")
        self._pair = struct.Struct("<II" if f.width == 4 else "<QQ")
        self._capacity = capacity(f.item_count)
        self._context: dict[str, Any] | None = None
        self._context_loaded = False
        self._first = f.first  # see locate()

    def __len__(self) -> int:
        return self.item_count

    # -- checks ---------------------------------------------------------------

    def guard(self) -> None:
        """Raise ``CorruptFileError`` if the mapped file is now shorter than its index says."""
        if self._guard is not None:
            self._guard()

    def check(self, start: int, length: int) -> None:
        """Check the blocks holding ``length`` bytes from ``start`` of the region, once each."""
        verified, shift = self._verified, self._shift
        last = min((start + max(length, 1) - 1) >> shift, len(verified) - 1)
        for number in range(start >> shift, last + 1):
            if not verified[number]:
                block = self.footer.block
                begin = number * block
                piece = self._region[begin:min(begin + block, self.footer.blocks)]
                if self.csum(piece) != _U32.unpack_from(self._sums, 4 * number)[0]:
                    raise corrupt(
                        self.name, f"its index is damaged (checksum mismatch in bytes "
                        f"{self.data_end + begin} to {self.data_end + begin + len(piece)})"
                    )
                with self._counting:  # two threads may check one block at once
                    if not verified[number]:
                        verified[number] = 1
                        self._unverified -= 1
                        if not self._unverified:
                            # Every block checked: lookups skip the tests of flags
                            # (a third of a warm lookup of a NamedTuple key).
                            self._lazy = False

    def check_all(self) -> None:
        """Check every block, and that the keys of a :data:`KEYS_RANGE` file are that range."""
        self.guard()
        self.check(0, self.footer.blocks)
        self._lazy = False
        f, first = self.footer, self._first
        if first is not None:
            blob, bounds = spell_int_keys(np.arange(first, first + f.item_count, dtype=np.int64))
            ends = np.frombuffer(
                self._region[f.key_offsets:f.table], "<u4" if f.width == 4 else "<u8"
            )
            if (
                f.keys_length != len(blob) or not np.array_equal(ends, bounds)
                or self._region[f.keys:f.keys + f.keys_length] != blob
            ):
                raise corrupt(
                    self.name, f"its footer declares the keys {first} to "
                    f"{first + f.item_count - 1}, which its key bytes do not spell"
                )

    # -- lookups --------------------------------------------------------------

    def locate(self, key: Any) -> Entry2:
        """The entry of ``key``; ``KeyError`` if it is not in the file."""
        try:
            first = self._first
            if first is not None:
                # A file of the keys first, first + 1, ... (KEYS_RANGE): key k is
                # entry k - first, and no other key is in it.
                number = (key if type(key) is int else self._spelled_int(key)) - first
                if not 0 <= number < self.item_count:
                    raise KeyError(key)
                return self.entry(number)
            pickled = int_key_bytes(key) if type(key) is int else key_bytes(key)
            return self.entry(self.find(pickled, key))
        except (KeyError, pickle.PicklingError, TypeError, AttributeError, RecursionError):
            try:
                hash(key)
            except TypeError:
                raise KeyError(f"{key!r} (unhashable) is not a key of {self.name}") from None
            raise KeyError(f"{key!r} is not a key of the PickledDataset {self.name}") from None

    def locate_many(self, keys: Sequence[Any]) -> list[Entry2]:
        """``[locate(key) for key in keys]``, quicker in a file of :data:`KEYS_RANGE`.

        There each int key is placed by a subtraction, in a loop without a
        call per key but the entry's; any other key, and any key outside the
        range, goes through :meth:`locate`, which decides.
        """
        first = self._first
        if first is None:
            return [self.locate(key) for key in keys]
        count, entry, locate = self.item_count, self.entry, self.locate
        out: list[Entry2] = []
        append = out.append
        for key in keys:
            number = key - first if type(key) is int else -1
            append(entry(number) if 0 <= number < count else locate(key))
        return out

    def _spelled_int(self, key: Any) -> int:
        """The int that ``key`` is stored as (a numpy int, say); KeyError if none."""
        data = key_bytes(key)
        if len(data) > 4 and data[2] in b"KMJ":
            value = int.from_bytes(data[3:-1], "little", signed=data[2] == ord("J"))
            if int_key_bytes(value) == data:
                return value
        raise KeyError(key)

    def find(self, pickled: bytes, key: Any) -> int:
        """The entry number of the key pickled as ``pickled``."""
        buffer, lazy, width = self._buffer, self._lazy, self._width
        count, keys_at, keys_length = self.item_count, self._keys_at, self._keys_length
        table_at, offsets_at, prints_at = self._table_at, self._offsets_at, self._prints_at
        # Lazy checks test the block's flag here and call check() only for a block not
        # checked yet: a method call per touch tripled the cost of a warm lookup.
        verified, shift, base = self._verified, self._shift, self._entries_at
        hashed = (self.csum(pickled) * _GOLDEN) & _MASK32
        slot = (hashed * self._capacity) >> 32
        fingerprint = hashed & 0xFF
        unpack_slot, unpack_pair = self._slot.unpack_from, self._pair.unpack_from
        size = len(pickled)
        while slot < self._table_length:
            if lazy:
                at = prints_at - base + slot
                if not verified[at >> shift]:
                    self.check(at, 1)
            seen = buffer[prints_at + slot]
            if seen != fingerprint:  # another key's slot, or an empty one (printed 0)
                if not seen and self._empty(slot):
                    break
                slot += 1
                continue
            if lazy:
                at = table_at - base + slot * width
                if not (verified[at >> shift] and verified[(at + width - 1) >> shift]):
                    self.check(at, width)
            number = unpack_slot(buffer, table_at + slot * width)[0]
            if not number:
                break
            number -= 1
            if number >= count:
                raise corrupt(self.name, "its hash table names an entry past the end")
            if lazy:
                at = offsets_at - base + number * width
                if not (verified[at >> shift] and verified[(at + 2 * width - 1) >> shift]):
                    self.check(at, 2 * width)
            a, b = unpack_pair(buffer, offsets_at + number * width)
            if b - a == size:
                if not a <= b <= keys_length:
                    raise corrupt(self.name, "its index places a key outside its key bytes")
                if lazy:
                    at = keys_at - base + a
                    if size > self.footer.block or not (
                        verified[at >> shift] and verified[(at + size - 1) >> shift]
                    ):
                        self.check(at, size)
                if buffer[keys_at + a:keys_at + b] == pickled:
                    return int(number)
            slot += 1
        raise KeyError(f"{key!r} is not a key of the PickledDataset {self.name}")

    def _empty(self, slot: int) -> bool:
        at = self._table_at + slot * self._width
        if self._lazy:
            self.check(at - self._entries_at, self._width)
        return not self._slot.unpack_from(self._buffer, at)[0]

    def entry(self, number: int) -> Entry2:
        """The entry of the item stored ``number``-th."""
        at = 16 * number
        if self._lazy and not (
            self._verified[at >> self._shift] and self._verified[(at + 23) >> self._shift]
        ):
            self.check(at, 24)
        if number + 1 < self.item_count:
            offset, info, crc, end = _ENTRY_AND_NEXT.unpack_from(
                self._buffer, self._entries_at + at
            )
        else:
            offset, info, crc = ENTRY.unpack_from(self._buffer, self._entries_at + at)
            end = self.data_end
        span = end - offset
        if offset < HEADER2.size or span < 0 or end > self.data_end:
            raise self._misplaced(number)
        tag = info >> TAG_SHIFT
        if tag == 0:
            if info != span:
                raise self._misplaced(number)
            return offset, span, span, None, crc
        low = info & LOW
        if tag < 3:
            align = ALIGN if tag == 1 else PAGE
            start = offset + low
            start += -start % align
            if start > end:
                raise self._misplaced(number)
            return offset, span, low, ((start - offset, span),), crc
        return self._extended(number, offset, span, low, crc)

    @property
    def keeps_unmapped(self) -> bool:
        """Whether the file keeps the checksums of items outside their mapped buffers."""
        return self.footer.unmapped is not None

    def unmapped_sum(self, number: int) -> int | None:
        """The checksum of item ``number``'s span outside its mapped buffers (meant for
        items holding some); None if the file does not keep it."""
        at = self.footer.unmapped
        if at is None:
            return None
        at += 4 * number
        if self._lazy:
            self.check(at, 4)
        value: int = _U32.unpack_from(self._region, at)[0]
        return value

    def number_at(self, offset: int) -> int:
        """The number of the entry of the item at ``offset`` (entries are in file order).

        A binary search over the entries, for the reads of items with mapped
        buffers, which are handed entries without their numbers.
        """
        lo, hi = 0, self.item_count
        while lo < hi:
            mid = (lo + hi) // 2
            if self._lazy:
                self.check(16 * mid, 8)
            if _U64.unpack_from(self._buffer, self._entries_at + 16 * mid)[0] < offset:
                lo = mid + 1
            else:
                hi = mid
        if lo == self.item_count or self.entry(lo)[0] != offset:
            raise corrupt(self.name, f"its index lists no item at offset {offset}")
        return lo

    def _extended(self, number: int, offset: int, span: int, row: int, crc: int) -> Entry2:
        f, region = self.footer, self._region
        if row >= f.ext_count:
            raise self._misplaced(number)
        at = f.ext + 24 * row
        if self._lazy:
            self.check(at, 24)
        plen, first, count = EXT.unpack_from(region, at)
        if plen > span or first + count > f.row_count:
            raise self._misplaced(number)
        if not count:
            if plen != span:
                raise self._misplaced(number)
            return offset, span, plen, None, crc
        at = f.rows + 16 * first
        if self._lazy:
            self.check(at, 16 * count)
        buffers = []
        done = plen
        for index in range(count):
            a, b = _ROW.unpack_from(region, at + 16 * index)
            if not done <= a <= b <= span:
                raise self._misplaced(number)
            buffers.append((a, b))
            done = b
        if done != span:
            raise self._misplaced(number)
        return offset, span, plen, tuple(buffers), crc

    def _misplaced(self, number: int) -> CorruptFileError:
        return corrupt(self.name, f"its index places item number {number} outside the data")

    # -- what is read whole -----------------------------------------------------

    def key_of(self, number: int) -> Any:
        """The key of the item stored ``number``-th, unpickled."""
        if self._first is not None:
            return self._first + number
        f = self.footer
        at = f.key_offsets + number * f.width
        self.guard()
        if self._lazy:
            self.check(at, 2 * f.width)
        a, b = self._pair.unpack_from(self._region, at)
        if not a <= b <= f.keys_length:
            raise corrupt(self.name, "its index places a key outside its key bytes")
        if self._lazy:
            self.check(f.keys + a, b - a)
        try:
            return self._loads(self._region[f.keys + a:f.keys + b])
        except Exception as exc:
            raise index_error(self.name, exc) from exc

    def keys(self) -> list[Any]:
        """Every key, in file order, unpickled now (counted, in a :data:`KEYS_RANGE` file)."""
        f = self.footer
        if self._first is not None:
            return list(range(self._first, self._first + f.item_count))
        return list(itertools.chain.from_iterable(self.key_chunks(max(1, f.item_count))))

    def key_chunks(self, size: int) -> Iterator[list[Any]]:
        """The keys in file order, ``size`` at a time, each chunk unpickled when asked for.

        The key parts are checked and copied out of the region before the
        first chunk: later chunks touch no map.
        """
        f = self.footer
        if self._first is not None:
            stop = self._first + f.item_count
            for start in range(self._first, stop, size):
                yield list(range(start, min(start + size, stop)))
            return
        self.guard()
        self.check(f.key_offsets, f.keys + f.keys_length - f.key_offsets)
        ends = np.frombuffer(
            self._region[f.key_offsets:f.table], "<u4" if f.width == 4 else "<u8"
        )
        if len(ends) and (
            int(ends[0]) != 0 or int(ends[-1]) != f.keys_length or (ends[1:] < ends[:-1]).any()
        ):
            raise corrupt(self.name, "its index places a key outside its key bytes")
        blob = bytes(self._region[f.keys:f.keys + f.keys_length])
        # Copied out of the map; made into ints a chunk at a time (500k at once
        # would hold the GIL for 10 ms).
        ends = ends.copy()
        loads = self._loads
        for start in range(0, f.item_count, size):
            bounds = ends[start:start + size + 1].tolist()
            try:
                chunk = [loads(blob[a:b]) for a, b in itertools.pairwise(bounds)]
            except Exception as exc:
                raise index_error(self.name, exc) from exc
            yield chunk

    @property
    def context(self) -> dict[str, Any] | None:
        if not self._context_loaded:
            f = self.footer
            self.guard()
            self.check(f.context, f.context_length)
            try:
                context = self._loads(self._region[f.context:f.context + f.context_length])
            except Exception as exc:
                raise index_error(self.name, exc) from exc
            if context is not None and not isinstance(context, dict):
                raise corrupt(self.name, "its context is not a dict")
            self._context = context
            self._context_loaded = True
        return self._context


class MemoryIndex:
    """The index of a format 0 or 1 file, built in memory when it was opened."""

    def __init__(self, layout: Layout) -> None:
        self.version = layout.version
        self.layout = layout
        self.context = layout.context

    def __len__(self) -> int:
        return len(self.layout.keys)

    def locate(self, key: Any) -> Entry2:
        try:
            return (*self.layout.entries[key], None)
        except TypeError:
            raise KeyError(f"{key!r} (unhashable) is not a key of the file") from None

    def keys(self) -> tuple[Any, ...]:
        return self.layout.keys
