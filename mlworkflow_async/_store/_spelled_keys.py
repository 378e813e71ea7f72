"""Keys spelled as the pickler spells them, without running the pickler.

A key is identified on disk by its protocol 5 pickle without memo or frame
(:func:`mlworkflow_async._store._format2.key_bytes`), computed at every
lookup and for every item written. Running the pickler costs 1.2 µs for a
string and 2.5 µs for a NamedTuple (a ``Pickler`` object, the class's
global lookup, the reduce protocol). The common key shapes are written here
instead, byte for byte as the pickler writes them: ints of 32 bits, strings,
bytes, floats, ``None``, bools, and tuples and plain NamedTuples of those.
:func:`spell_key` returns None for anything else, which is then pickled.

The tests compare both spellings over thousands of generated keys on every
supported Python.

Keys holding sets or frozensets, at any depth, are the exception the other
way: the pickler writes a set's elements in its iteration order, which
follows the hash seed of the process (``PYTHONHASHSEED``), so equal keys
would be spelled apart in two processes. :func:`canonical_key_bytes`
writes them with each set's elements in the order of their own spelling.

>>> spell_key(("a", 1))
b'\\x80\\x05\\x8c\\x01aK\\x01\\x86.'
>>> from urllib.parse import urlsplit  # a NamedTuple of strings
>>> spell_key(urlsplit("http://h/p"))[:30]
b'\\x80\\x05\\x8c\\x0curllib.parse\\x8c\\x0bSplitResult\\x93'
>>> spell_key([1]) is None  # a list is pickled, not spelled
True
"""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
import pickletools
import struct
import sys
from typing import Any, ClassVar

from ._format import PROTOCOL

__all__ = ["canonical_key_bytes", "framed_off", "holds_sets", "int_key_bytes", "spell_key"]

#: Longer spellings are left to the pickler, which frames pickles of 64 KiB or more.
_LIMIT = 60_000
_TUPLES = (b")", b"\x85", b"\x86", b"\x87")  # EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3
_DOUBLE = struct.Struct(">d")
_GETNEWARGS = collections.namedtuple("_Probe", "a").__getnewargs__.__code__  # type: ignore[attr-defined]
_NOT_SPELLED = b""


def framed_off(data: bytes) -> bytes:
    """A protocol 5 pickle without its optional leading FRAME opcode (9 bytes)."""
    return data[:2] + data[11:] if data[2] == 0x95 else data


#: Protocol 5 pickles of the ints 0 to 255: the commonest keys.
_SMALL_INTS = [framed_off(pickle.dumps(i, PROTOCOL)) for i in range(256)]


def int_key_bytes(key: int) -> bytes:
    """The key bytes of an ``int``, spelled without pickling for 32-bit values.

    About twice as quick as pickling (keys are pickled for every lookup and
    every item written, benchmarks W3a and W4); the opcodes are those the
    pickler picks: ``K`` (one unsigned byte), ``M`` (two), ``J`` (four, signed).

    >>> all(int_key_bytes(k) == framed_off(pickle.dumps(k, 5))
    ...     for k in (0, 255, 256, 65536, -1, 2**31, -2**31))
    True
    """
    if 0 <= key < 256:
        return _SMALL_INTS[key]
    if 0 <= key < 65536:
        return b"\x80\x05M" + key.to_bytes(2, "little") + b"."
    if -0x80000000 <= key < 0x80000000:
        return b"\x80\x05J" + key.to_bytes(4, "little", signed=True) + b"."
    return framed_off(pickle.dumps(key, PROTOCOL))


def spell_key(key: Any) -> bytes | None:
    """The key bytes of ``key`` if it has one of the spelled shapes, else None."""
    parts: list[bytes] = [b"\x80\x05"]
    if not _spell(key, parts, 0):
        return None
    parts.append(b".")
    data = b"".join(parts)
    return data if len(data) <= _LIMIT else None


def _spell(value: Any, parts: list[bytes], depth: int) -> bool:
    kind = type(value)
    if kind is str:
        # SHORT_BINUNICODE, or BINUNICODE from 256 bytes.
        return _counted(value.encode("utf-8", "surrogatepass"), b"\x8c", b"X", parts)
    if kind is bytes:
        # SHORT_BINBYTES, or BINBYTES from 256 bytes.
        return _counted(value, b"C", b"B", parts)
    if kind is int:
        if not -0x80000000 <= value < 0x80000000:
            return False  # LONG1: left to the pickler
        parts.append(int_key_bytes(value)[2:-1])
    elif kind is tuple:
        return _spell_tuple(value, parts, depth)
    elif kind is float:
        parts.append(b"G" + _DOUBLE.pack(value))  # BINFLOAT
    elif value is None:
        parts.append(b"N")
    elif kind is bool:
        parts.append(b"\x88" if value else b"\x89")  # NEWTRUE, NEWFALSE
    else:
        prefix = _prefixes.get(kind)
        if prefix is None:
            if len(_prefixes) >= 1024:  # classes made on the fly: hold none forever
                _prefixes.clear()
            prefix = _prefixes[kind] = _class_prefix(kind)
        # Registrations made after the class was first seen change what the pickler does.
        if not prefix or kind in copyreg.dispatch_table:
            return False
        parts.append(prefix)
        if not _spell_tuple(tuple(value), parts, depth):
            return False
        parts.append(b"\x81")  # NEWOBJ
    return True


def _counted(data: bytes, short: bytes, long: bytes, parts: list[bytes]) -> bool:
    """``data`` after its opcode and length: one byte below 256 bytes, else four."""
    size = len(data)
    if size > _LIMIT:
        return False
    parts.append(short + bytes((size,)) + data if size < 256
                 else long + size.to_bytes(4, "little") + data)
    return True


def _spell_tuple(value: tuple[Any, ...], parts: list[bytes], depth: int) -> bool:
    if depth > 20:  # deep nesting: the pickler's own rules (and errors) apply
        return False
    size = len(value)
    if size > 3:
        parts.append(b"(")  # MARK
    for element in value:
        if not _spell(element, parts, depth + 1):
            return False
    parts.append(_TUPLES[size] if size <= 3 else b"t")
    return True


_prefixes: dict[type, bytes] = {}


def _class_prefix(cls: type) -> bytes:
    """What the pickler writes before a plain NamedTuple's fields, or ``b""`` if not one.

    A plain NamedTuple is pickled as its class (module and qualified name,
    then STACK_GLOBAL), its fields as a tuple, and NEWOBJ: so it is when it
    keeps the reduce methods namedtuple gives it, has no instance dict or
    slots, and its class is found under its name.
    """
    try:
        plain = (
            issubclass(cls, tuple)
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is object.__getstate__
            and getattr(cls.__getnewargs__, "__code__", None) is _GETNEWARGS  # type: ignore[attr-defined]
            and not hasattr(cls, "__getnewargs_ex__")
            and cls.__basicsize__ == tuple.__basicsize__
            and cls.__dictoffset__ == 0
            and type(cls) is type
        )
        module_name, name = cls.__module__, cls.__qualname__
        if not plain or "<locals>" in name or (module_name, name) in copyreg._extension_registry:  # type: ignore[attr-defined]
            return _NOT_SPELLED
        found: Any = sys.modules[module_name]
        for part in name.split("."):
            found = getattr(found, part)
    except (AttributeError, KeyError, TypeError):
        return _NOT_SPELLED
    if found is not cls:
        return _NOT_SPELLED
    parts: list[bytes] = []
    if not (_spell(module_name, parts, 0) and _spell(name, parts, 0)):
        return _NOT_SPELLED
    return b"".join(parts) + b"\x93"  # STACK_GLOBAL


# -- keys holding sets ---------------------------------------------------------

_SET_OPCODES = frozenset({"FROZENSET", "EMPTY_SET"})


def holds_sets(data: bytes) -> bool:
    """Whether the pickle ``data`` builds a set or a frozenset.

    >>> holds_sets(pickle.dumps(("a", frozenset({1}))))
    True
    >>> holds_sets(pickle.dumps("\\u0451"))  # byte 0x91 inside a string is no opcode
    False
    """
    # Most pickles lack both opcode bytes: one scan in C rules them out.
    if b"\x91" not in data and b"\x8f" not in data:
        return False
    return any(op.name in _SET_OPCODES for op, _, _ in pickletools.genops(data))


def canonical_key_bytes(key: Any) -> bytes:
    """The key bytes of a key holding sets: each set's elements in the order of their bytes.

    The bytes are those of the pickler (protocol 5, no memo) but for that
    order, and without frames; they unpickle to an equal key in any process.

    >>> canonical_key_bytes(frozenset({"b", "a"})) == canonical_key_bytes(frozenset({"a", "b"}))
    True
    >>> canonical_key_bytes(frozenset({"b", "a"}))
    b'\\x80\\x05(\\x8c\\x01a\\x8c\\x01b\\x91.'
    """
    return b"\x80\x05" + _body(key) + b"."


def _body(value: Any) -> bytes:
    """The opcodes that build ``value``, without protocol, frame or stop."""
    out = io.BytesIO()
    pickler: Any = _CanonicalPickler(out, PROTOCOL)
    pickler.fast = True  # no memo: the bytes depend on values, not on identities
    # save(), not dump(): dump() would add the protocol, frames and the stop.
    pickler.save(value)
    return out.getvalue()


def _sorted_bodies(elements: Any) -> list[bytes]:
    return sorted(map(_body, elements))


def _save_frozenset(pickler: Any, obj: frozenset[Any]) -> None:
    pickler.write(pickle.MARK + b"".join(_sorted_bodies(obj)) + pickle.FROZENSET)


def _save_set(pickler: Any, obj: set[Any]) -> None:
    # As the pickler does: an empty set, then its elements added by batches of 1000.
    pickler.write(pickle.EMPTY_SET)
    bodies = _sorted_bodies(obj)
    for start in range(0, len(bodies), 1000):
        pickler.write(pickle.MARK + b"".join(bodies[start:start + 1000]) + pickle.ADDITEMS)


class _CanonicalPickler(pickle._Pickler):
    """The pure-Python pickler (whose dispatch can be changed), writing sets in order."""

    dispatch: ClassVar[dict[type, Any]] = {
        **pickle._Pickler.dispatch, frozenset: _save_frozenset, set: _save_set,
    }
