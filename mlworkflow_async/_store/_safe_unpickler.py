"""Unpickling that no file can crash, and that runs only allowed code in safe mode.

A pickle names the functions and classes it needs by module and name; the
unpickler imports and calls them. Safe mode refuses every name not on a
short list, which stops a crafted file from running arbitrary code
(``os.system``...).

Numpy needs more care, in every mode. Its pickles build a dtype and then set
its *state* (fields, item size, flags) from the file, and build arrays the
same way; numpy applies such a state as-is, so a crafted or merely damaged
file can make a dtype that reads outside its buffers. Here a dtype is only
ever built from a description numpy checks itself (``numpy.dtype("<i8")``,
a list of fields) and must then match the state the file gives exactly; an
array's shape and item size must match its data exactly.

- Trusted files (``safe=False``): a pickle that does not mention numpy's
  dtypes is handed to ``pickle.loads`` untouched. One that does is read by
  the C unpickler with checking stand-ins for numpy's functions, and each
  dtype it made is checked before use and again before the item is returned.
  A dtype with objects in it sends the pickle to the careful reader below.
- Safe mode (``safe=True``) and object dtypes: the careful reader, a
  subclass of the standard library's pure-Python unpickler, which checks a
  numpy state *before* anything is built from it, keeps its memo in a dict
  (the C unpickler allocates its memo up to whatever index a file names),
  and bounds what one pickle may build (:data:`BUILD_FACTOR`).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import io
import math
import pickle
import re
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "BUILD_FACTOR",
    "BUILD_SLACK",
    "BadNumpyState",
    "ForbiddenGlobal",
    "Loads",
    "Refused",
    "allowed_names",
    "check_dtype",
    "load_consecutive",
    "load_plain_int",
    "make_loads",
]

Loads = Callable[..., Any]

#: In safe mode, one pickle may build at most ``BUILD_FACTOR`` times its stored
#: size (pickle plus out-of-band buffers), plus :data:`BUILD_SLACK` bytes,
#: through the calls it makes (``bytearray(n)``, ``frozenset(...)``, arrays).
BUILD_FACTOR = 8
BUILD_SLACK = 1 << 20


class Refused(pickle.UnpicklingError):
    """Safe mode does not build what the pickle asks for; the caller adds the context."""


class ForbiddenGlobal(Refused):
    """A pickle asked for a name that is not allowed."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class BadNumpyState(pickle.UnpicklingError):
    """A numpy dtype or array in the pickle is inconsistent: the file is damaged."""


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in safe mode, where it must not be called.

    ``numpy.ndarray(shape, dtype, buffer)`` with an object dtype would read
    pointers from the buffer; numpy's pickles only pass the class to
    ``_reconstruct``, which accepts this token.
    """

    def __repr__(self) -> str:
        return "numpy.ndarray (not callable when unpickling safely)"


_NDARRAY = _NdarrayToken()


def _numpy_core() -> Any:
    core: Any = getattr(np, "_core", None)
    if core is None or not hasattr(core, "multiarray"):  # numpy 1.x
        import numpy.core as core
    return core


_CORE = _numpy_core()
_RECONSTRUCT = _CORE.multiarray._reconstruct
_SCALAR = _CORE.multiarray.scalar

# -- dtypes ------------------------------------------------------------------

_MAX_DEPTH = 16
_MAX_SPEC = 64
_ALIGNED_STRUCT = 0x80  # numpy's NPY_ALIGNED_STRUCT flag
_NATIVE = "<" if sys.byteorder == "little" else ">"
# The builtin dtypes are immutable singletons (numpy ignores a state set on them).
_SINGLETONS = {id(np.dtype(code)): np.dtype(code) for code in "?bBhHiIlLqQefdgFDG"}
_OBJECT = np.dtype("O")
_CACHE_SIZE = 512
_spec_cache: dict[Any, np.dtype[Any]] = {}
_state_cache: dict[Any, np.dtype[Any]] = {}
_checked: dict[Any, np.dtype[Any]] = {}


def _remember(cache: dict[Any, np.dtype[Any]], key: Any, value: np.dtype[Any]) -> None:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value


def spec_dtype(spec: object, objects: bool) -> np.dtype[Any]:
    """The dtype a short description (``"<f4"``, ``b"b"``) names, parsed by numpy."""
    try:
        return _spec_cache[(spec, objects)]
    except (KeyError, TypeError):
        pass
    text = spec.decode("ascii", "replace") if type(spec) is bytes else spec
    if type(text) is not str or len(text) > _MAX_SPEC:
        raise BadNumpyState(f"a dtype is described by {spec!r:.80}, not a short string")
    try:
        dtype = np.dtype(text)
    except Exception as exc:
        raise BadNumpyState(f"no dtype is spelled {text!r}: {exc}") from None
    if dtype.hasobject and not objects:
        raise Refused("an array of Python objects (dtype 'O')")
    _remember(_spec_cache, (spec, objects), dtype)
    return dtype


def check_dtype(dtype: object, objects: bool, depth: int = 0) -> np.dtype[Any]:
    """A consistent dtype equal to ``dtype``, or raise ``BadNumpyState``.

    ``dtype`` may hold any state a file set on it; it is only read through
    ``__reduce__``, which copies out its fields without using them, and
    rebuilt from that description.

    >>> check_dtype(np.dtype(">i4"), objects=False)
    dtype('>i4')
    """
    singleton = _SINGLETONS.get(id(dtype))
    if singleton is not None and singleton is dtype:
        return singleton
    if dtype is _OBJECT:
        if not objects:
            raise Refused("an array of Python objects (dtype 'O')")
        return _OBJECT
    if not isinstance(dtype, np.dtype):
        raise BadNumpyState(f"a dtype is expected, found {type(dtype).__name__}")
    key = _key(dtype, 0)
    if key is not None:
        try:
            return _checked[(key, objects)]
        except (KeyError, TypeError):
            pass
    try:
        reduced: Any = dtype.__reduce__()
        spec, state = reduced[1][0], reduced[2]
    except Exception as exc:
        raise BadNumpyState(f"a dtype cannot describe itself: {exc}") from None
    candidate = rebuild_dtype(spec, state, objects, depth)
    own = _key(candidate, 0)
    if own is not None:
        with contextlib.suppress(TypeError):
            _remember(_checked, (own, objects), candidate)
    return candidate


def _key(dtype: np.dtype[Any], depth: int) -> Any:
    """Everything a state can set on ``dtype``, read without using it; None if unsure.

    Two dtypes with the same key are the same dtype, so a key seen on a
    dtype that was rebuilt from its description is known to be consistent.
    """
    if depth > _MAX_DEPTH or dtype.metadata is not None:
        return None
    entries = None
    fields = dtype.fields
    if fields is not None:
        parts = []
        for name, entry in fields.items():
            if type(entry) is not tuple or not 2 <= len(entry) <= 3 or type(entry[1]) is not int:
                return None
            inner = entry[0]
            inner_key = _key(inner, depth + 1) if isinstance(inner, np.dtype) else None
            if inner_key is None:
                return None
            parts.append((name, inner_key, entry[1], entry[2] if len(entry) == 3 else None))
        entries = (dtype.names, tuple(parts))
    sub = dtype.subdtype
    sub_key = None
    if sub is not None:
        inner_key = _key(sub[0], depth + 1)
        if inner_key is None:
            return None
        sub_key = (inner_key, sub[1])
    order = dtype.byteorder
    return (
        type(dtype), dtype.str if dtype.kind in "mM" else None, dtype.itemsize,
        _NATIVE if order == "=" else order, dtype.flags, dtype.alignment, entries, sub_key,
    )


def rebuild_dtype(spec: object, state: object, objects: bool, depth: int = 0) -> np.dtype[Any]:
    """The dtype ``numpy.dtype(spec)`` given ``state``, built from a description.

    ``state`` is what numpy's pickles hand to ``dtype.__setstate__``. The
    dtype is built by numpy's own constructor from the parts of ``state``,
    then must have exactly that state, or ``BadNumpyState`` is raised.
    """
    if depth > _MAX_DEPTH:
        raise BadNumpyState("dtypes are nested too deeply")
    base = spec_dtype(spec, objects)
    if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise BadNumpyState(f"unexpected state for a dtype: {state!r:.120}")
    _, order, sub, names, fields, elsize, _, flags = state[:8]
    simple = sub is None and names is None and fields is None
    if simple:
        try:
            return _state_cache[(spec, state, objects)]
        except (KeyError, TypeError):
            pass
    if type(order) is not str or order not in ("<", ">", "|", "="):
        raise BadNumpyState(f"a dtype has byte order {order!r}")
    try:
        if sub is not None:
            candidate = _subarray(sub, objects, depth)
        elif not simple:
            candidate = _structured(names, fields, elsize, flags, objects, depth)
        else:
            candidate = _plain(base, spec, state, order)
    except (BadNumpyState, Refused):
        raise
    except Exception as exc:
        raise BadNumpyState(f"a dtype cannot be rebuilt: {type(exc).__name__}: {exc}") from None
    if candidate.hasobject and not objects:
        raise Refused("an array of Python objects (dtype 'O')")
    reduced: Any = candidate.__reduce__()
    own_spec, own = reduced[1][0], reduced[2]
    if own_spec != spec or not _same_state(own, state):
        raise BadNumpyState(f"a dtype's state {state!r:.160} is inconsistent")
    if simple:
        _remember(_state_cache, (spec, state, objects), candidate)
    return candidate  # type: ignore[no-any-return]


def _plain(base: np.dtype[Any], spec: object, state: tuple[Any, ...], order: str) -> Any:
    candidate = base
    if base.kind in "mM" and len(state) == 9:
        meta = state[8]
        if not (type(meta) is tuple and len(meta) == 2 and type(meta[1]) is tuple):
            raise BadNumpyState(f"a datetime dtype has metadata {meta!r:.80}")
        unit, count = meta[1][:2]
        if type(unit) is not bytes or type(count) is not int or not 0 < count < 1 << 31:
            raise BadNumpyState(f"a datetime dtype has unit {meta[1]!r:.80}")
        text = spec.decode("ascii") if type(spec) is bytes else str(spec)
        candidate = np.dtype(f"{text}[{count}{unit.decode('ascii')}]")
        if meta[0] is not None:
            candidate = np.dtype(candidate, metadata=dict(meta[0]))
    elif len(state) == 9 and state[8] is not None:
        candidate = np.dtype(candidate, metadata=dict(state[8]))
    if order in "<>" and candidate.byteorder != "|":
        candidate = candidate.newbyteorder(order)  # type: ignore[arg-type]
    return candidate


def _subarray(sub: object, objects: bool, depth: int) -> Any:
    if type(sub) is not tuple or len(sub) != 2:
        raise BadNumpyState(f"a dtype has subarray {sub!r:.80}")
    inner = check_dtype(sub[0], objects, depth + 1)
    return np.dtype((inner, _shape(sub[1])))


def _structured(
    names: object, fields: object, elsize: object, flags: object, objects: bool, depth: int
) -> Any:
    if type(names) is not tuple or type(fields) is not dict or type(elsize) is not int:
        raise BadNumpyState("a structured dtype has malformed fields")
    formats, offsets, titles = [], [], []
    if len(fields) > 2 * len(names):
        raise BadNumpyState("a structured dtype has more fields than names")
    for name in names:
        entry = fields.get(name) if type(name) is str else None
        if type(entry) is not tuple or len(entry) not in (2, 3) or type(entry[1]) is not int:
            raise BadNumpyState(f"a structured dtype has a malformed field {name!r:.40}")
        formats.append(check_dtype(entry[0], objects, depth + 1))
        offsets.append(entry[1])
        titles.append(entry[2] if len(entry) == 3 else None)
    # Title keys must share their field's entry: nothing else in ``fields``
    # may be compared (a dtype there has not been checked).
    for key, entry in fields.items():
        if key not in names and not any(
            entry is fields.get(name) and title == key
            for name, title in zip(names, titles, strict=True)
        ):
            raise BadNumpyState(f"a structured dtype has a stray field {key!r:.40}")
    description: dict[str, Any] = {
        "names": list(names), "formats": formats, "offsets": offsets, "itemsize": elsize
    }
    if any(title is not None for title in titles):
        description["titles"] = titles
    aligned = type(flags) is int and bool(flags & _ALIGNED_STRUCT)
    return np.dtype(description, align=aligned)  # type: ignore[call-overload]


def _same_state(own: tuple[Any, ...], given: tuple[Any, ...]) -> bool:
    def order(value: Any) -> Any:
        return _NATIVE if value == "=" else value

    own_meta = own[8] if len(own) == 9 else None
    given_meta = given[8] if len(given) == 9 else None
    try:
        return bool(
            order(own[1]) == order(given[1]) and own[2:8] == given[2:8]
            and own_meta == given_meta
        )
    except Exception:  # e.g. comparing arrays in a damaged state
        return False


def _shape(shape: object) -> tuple[int, ...]:
    if type(shape) is int:
        shape = (shape,)
    if type(shape) is not tuple or len(shape) > 64 or not all(
        type(n) is int and 0 <= n < 1 << 62 for n in shape
    ):
        raise BadNumpyState(f"an array has shape {shape!r:.80}")
    return shape


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _empty_shape(shape: object) -> tuple[int, ...]:
    """The shape ``_reconstruct`` is given: numpy's pickles always ask for an empty array.

    Its contents come with the state that follows; ``_reconstruct`` itself
    leaves memory uninitialised, which a file must not be able to read.
    """
    size = _shape(shape)
    if _count(size):
        raise BadNumpyState(f"an array is rebuilt with shape {size}, not empty")
    return size


# -- the checking C unpickler (trusted files) ---------------------------------

# Pickles that may set a numpy state: numpy's own reductions name these.
_DTYPE = re.compile(rb"dtype").search
_RECONSTRUCT_NAME = re.compile(rb"_reconstruct").search
# numpy spells the object dtype "O8" in its pickles.
_OBJECTS = re.compile(rb"O8").search


def _sets_numpy_state(data: Any) -> bool:
    if type(data) is memoryview:  # no substring test; re reads any buffer
        return _DTYPE(data) is not None or _RECONSTRUCT_NAME(data) is not None
    return b"dtype" in data or b"_reconstruct" in data


def _numpy_names(prefix: str) -> dict[tuple[str, str], str]:
    """``(module, name)`` of numpy's pickle helpers -> the method standing in for each."""
    names = {("numpy", "dtype"): "_dtype", ("numpy", "frombuffer"): "_np_frombuffer"}
    for package in ("numpy.core", "numpy._core"):
        names[(f"{package}.multiarray", "_reconstruct")] = "_reconstruct"
        names[(f"{package}.multiarray", "scalar")] = "_scalar"
        names[(f"{package}.numeric", "_frombuffer")] = "_frombuffer"
    return {key: prefix + value for key, value in names.items()}


def _resolve(dtype: object, objects: bool) -> np.dtype[Any]:
    if isinstance(dtype, np.dtype):
        return check_dtype(dtype, objects)
    if type(dtype) is _PendingDtype:
        raise BadNumpyState("a dtype is used before its state is set")
    return spec_dtype(dtype, objects)


def _frombuffer_checked(buffer: Any, dtype: object, shape: object, order: object,
                        objects: bool) -> Any:
    if order not in ("C", "F", "A"):
        raise BadNumpyState(f"an array has memory order {order!r:.20}")
    dt = _resolve(dtype, objects)
    if dt.hasobject or dt.itemsize == 0:
        raise BadNumpyState(f"an array of dtype {dt} cannot come from a buffer")
    return np.frombuffer(buffer, dt).reshape(_shape(shape), order=order)


def _scalar_checked(dtype: object, data: object) -> Any:
    dt = _resolve(dtype, objects=False)
    if dt.hasobject or dt.subdtype is not None:
        raise BadNumpyState(f"a numpy scalar of dtype {dt}")
    if type(data) is not bytes or len(data) != dt.itemsize:
        raise BadNumpyState(f"a numpy scalar of dtype {dt} has {len(data)!r:.20} bytes"
                            if isinstance(data, bytes) else f"a numpy scalar of dtype {dt} "
                            f"is given a {type(data).__name__}")
    return _SCALAR(dt, data)


class _Checked(pickle.Unpickler):
    """The C unpickler, with numpy's helpers replaced by checking ones (trusted files)."""

    _special = _numpy_names("_checked")

    def __init__(self, file: io.BytesIO, buffers: Any) -> None:
        super().__init__(file, buffers=buffers)
        self._made: list[np.dtype[Any]] = []
        self._seen: set[int] = set()  # ids of those already checked (all stay alive)

    def find_class(self, module: str, name: str) -> Any:
        special = self._special.get((module, name))
        if special is not None:
            return getattr(self, special)
        return super().find_class(module, name)

    def load(self) -> Any:
        result = super().load()
        for dtype in self._made:  # also those used only by numpy's own __setstate__
            if id(dtype) not in self._seen:
                check_dtype(dtype, objects=False)
        return result

    def _checked_dtype(self, spec: object, align: object = False, copy: object = False) -> Any:
        # A copy (as numpy's pickles ask): a builtin singleton ignores any state.
        dtype = np.dtype(spec_dtype(spec, objects=False), bool(align), True)
        self._made.append(dtype)
        return dtype

    def _checked_scalar(self, dtype: object, data: object = None) -> Any:
        scalar = _scalar_checked(dtype, data)
        self._seen.add(id(dtype))
        return scalar

    def _checked_reconstruct(self, subtype: object, shape: object, dtype: object) -> Any:
        dt, size = _resolve(dtype, objects=False), _empty_shape(shape)
        if not (isinstance(subtype, type) and issubclass(subtype, np.ndarray)):
            raise BadNumpyState(f"cannot rebuild an array of type {subtype!r:.80}")
        return _RECONSTRUCT(subtype, size, dt)

    def _checked_frombuffer(self, buffer: Any, dtype: object, shape: object,
                            order: object) -> Any:
        return _frombuffer_checked(buffer, dtype, shape, order, objects=False)

    def _checked_np_frombuffer(self, buffer: Any, dtype: object = float, count: Any = -1,
                               offset: Any = 0) -> Any:
        dt = _resolve(dtype, objects=False)
        return np.frombuffer(buffer, dt, count, offset)


# -- the careful pure-Python unpickler ---------------------------------------


class _PendingDtype:
    """What ``numpy.dtype(spec)`` gives until its state arrives (the next BUILD)."""

    __slots__ = ("done", "memo_keys", "spec")

    def __init__(self, spec: object) -> None:
        self.spec = spec
        self.memo_keys: list[Any] = []
        self.done = False

    def __repr__(self) -> str:
        return f"<numpy dtype {self.spec!r} whose state was never set>"


_SIZED = (bytes, bytearray, str, list, tuple, dict, set, frozenset, memoryview)
_MISSING = object()
_Base: Any = pickle._Unpickler


class _Careful(_Base):  # type: ignore[misc]
    """Checks every numpy state before it is used; memo in a dict; bounded building.

    ``names`` None: any importable name (a trusted file with object arrays).
    """

    dispatch: ClassVar[dict[int, Any]] = dict(_Base.dispatch)
    _special = _numpy_names("_careful")

    def __init__(
        self,
        file: io.BytesIO,
        buffers: Any,
        *,
        names: dict[tuple[str, str], Any] | None,
        classes: frozenset[type],
        budget: float,
        size: int,
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._names = names
        self._classes = classes
        self._budget = budget
        self._size = size
        self._objects = names is None
        self._pending: list[_PendingDtype] = []
        self._fresh: dict[int, np.ndarray[Any, Any]] = {}

    # -- names ---------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        special = self._special.get((module, name))
        if special is not None:
            return getattr(self, special)
        if self._names is None:
            return super().find_class(module, name)
        found = self._names.get((module, name), _MISSING)
        if found is _MISSING:
            raise ForbiddenGlobal(module, name)
        if type(found) is str:  # a bounded stand-in for a builtin
            return getattr(self, found)
        return found

    def _charge(self, amount: float) -> None:
        self._budget -= amount
        if self._budget < 0:
            raise Refused(
                f"it builds more than {BUILD_FACTOR} times its stored size "
                f"(plus {BUILD_SLACK >> 20} MiB)"
            )

    def _charge_source(self, source: object, per_item: int) -> None:
        if type(source) is int:
            self._charge(source)
        elif isinstance(source, _SIZED):
            self._charge(per_item * len(source) + 64)
        elif isinstance(source, np.ndarray):
            self._charge(per_item * source.size + source.nbytes)
        else:
            raise Refused(f"builds a collection from a {type(source).__name__}")

    def _safe_bytes(self, source: Any = b"", *rest: Any) -> bytes:
        self._charge_source(source, 4)
        return bytes(source, *rest)

    def _safe_bytearray(self, source: Any = b"", *rest: Any) -> bytearray:
        self._charge_source(source, 4)
        return bytearray(source, *rest)

    def _safe_set(self, items: Any = ()) -> set[Any]:
        self._charge_source(items, 32)
        return set(items)

    def _safe_frozenset(self, items: Any = ()) -> frozenset[Any]:
        self._charge_source(items, 32)
        return frozenset(items)

    def _safe_ordered_dict(self, items: Any = ()) -> collections.OrderedDict[Any, Any]:
        self._charge_source(items, 64)
        return collections.OrderedDict(items)

    def _safe_encode(self, text: object, encoding: object = "utf-8",
                     errors: object = "strict") -> bytes:
        # Protocol 2 spells bytes as ``_codecs.encode(text, "latin1")``: nothing else.
        if type(text) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise Refused(f"calls _codecs.encode with encoding {encoding!r:.40}")
        self._charge(len(text))
        return codecs.encode(text, "latin1")

    # -- numpy -------------------------------------------------------------

    def _careful_dtype(self, spec: object, align: object = False, copy: object = False) -> Any:
        spec_dtype(spec, self._objects)  # fail early on a bad description
        pending = _PendingDtype(spec)
        self._pending.append(pending)
        return pending

    def _careful_scalar(self, dtype: object, data: object = None) -> Any:
        return _scalar_checked(dtype, data)

    def _careful_reconstruct(self, subtype: object, shape: object, dtype: object) -> Any:
        if subtype is not _NDARRAY and subtype is not np.ndarray:
            raise BadNumpyState(f"cannot rebuild an array of type {subtype!r:.80}")
        dt, size = _resolve(dtype, self._objects), _empty_shape(shape)
        array: np.ndarray[Any, Any] = np.empty(size, dt)
        self._fresh[id(array)] = array
        return array

    def _careful_frombuffer(self, buffer: Any, dtype: object, shape: object,
                            order: object) -> Any:
        return _frombuffer_checked(buffer, dtype, shape, order, self._objects)

    def _careful_np_frombuffer(self, buffer: Any, dtype: object = float, count: Any = -1,
                               offset: Any = 0) -> Any:
        dt = _resolve(dtype, self._objects)
        return np.frombuffer(buffer, dt, count, offset)

    # -- opcodes -------------------------------------------------------------

    def load(self) -> Any:
        self._pending, self._fresh = [], {}
        result = super().load()
        if self._fresh:
            raise BadNumpyState("an array is never given its contents")
        pending, self._pending = self._pending, []
        self.memo.clear()
        self.stack: list[Any] = []
        self.metastack: list[Any] = []
        for placeholder in pending:
            # Held only by this list, the loop and getrefcount's argument once
            # replaced everywhere the unpickler could see.
            if not placeholder.done or sys.getrefcount(placeholder) > 3:
                raise BadNumpyState("a numpy dtype is used without its state")
        return result

    def _build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if type(inst) is _PendingDtype:
            if inst.done:
                raise BadNumpyState("the state of a dtype is set twice")
            dtype = rebuild_dtype(inst.spec, state, self._objects)
            inst.done = True
            stack[-1] = dtype
            for key in inst.memo_keys:
                if self.memo.get(key) is inst:
                    self.memo[key] = dtype
            return
        if isinstance(inst, np.ndarray):
            self._build_array(inst, state)
            return
        if isinstance(inst, (np.dtype, np.generic)):
            raise BadNumpyState(f"the state of a {type(inst).__name__} is set")
        if self._names is not None and type(inst) not in self._classes:
            raise Refused(f"sets the state of a {type(inst).__qualname__}, which is not allowed")
        stack.append(state)
        _Base.load_build(self)

    def _build_array(self, array: np.ndarray[Any, Any], state: object) -> None:
        if self._fresh.pop(id(array), None) is not array:
            raise BadNumpyState("the state of an array not being rebuilt is set")
        if type(state) is tuple and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if type(state) is not tuple or len(state) != 4:
            raise BadNumpyState(f"unexpected state for an array: {state!r:.80}")
        shape, dtype, fortran, raw = state
        size = _shape(shape)
        dt = check_dtype(dtype, self._objects)
        count = _count(size)
        if dt.subdtype is not None:
            raise BadNumpyState(f"an array has dtype {dt}")
        if dt.hasobject:
            if type(raw) is not list or len(raw) != count:
                raise BadNumpyState("an object array's items do not match its shape")
        elif type(raw) not in (bytes, bytearray) or len(raw) != count * dt.itemsize:
            raise BadNumpyState(f"an array of shape {size} and dtype {dt} has "
                                f"{len(raw) if isinstance(raw, (bytes, bytearray)) else 'no'} "
                                f"bytes of data")
        self._charge(count * dt.itemsize + count)
        array.__setstate__((1, size, dt, bool(fortran), raw))  # type: ignore[arg-type]

    def _memoize_at(self, key: Any) -> None:
        value = self.stack[-1]
        self.memo[key] = value
        if type(value) is _PendingDtype:
            value.memo_keys.append(key)

    def _memoize(self) -> None:
        self._memoize_at(len(self.memo))

    def _put(self) -> None:
        key = int(self.readline()[:-1])
        if key < 0:
            raise ValueError("negative PUT argument")
        self._memoize_at(key)

    def _binput(self) -> None:
        self._memoize_at(self.read(1)[0])

    def _long_binput(self) -> None:
        (key,) = struct.unpack("<I", self.read(4))
        self._memoize_at(key)

    def _bytearray8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self._size:  # the standard loader zero-fills it before reading
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {size} bytes in a {self._size}-byte "
                                         f"pickle")
        data = bytearray(size)
        self.readinto(data)
        self.append(data)

    dispatch[pickle.BUILD[0]] = _build
    dispatch[pickle.MEMOIZE[0]] = _memoize
    dispatch[pickle.PUT[0]] = _put
    dispatch[pickle.BINPUT[0]] = _binput
    dispatch[pickle.LONG_BINPUT[0]] = _long_binput
    dispatch[pickle.BYTEARRAY8[0]] = _bytearray8


# -- what safe mode allows -----------------------------------------------------

_SAFE_NAMES: dict[tuple[str, str], Any] = {
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    # Bounded stand-ins (methods of _Careful); ``range`` and other lazy
    # sequences are not callable, so a small file cannot ask for a huge one.
    ("builtins", "bytes"): "_safe_bytes",
    ("builtins", "bytearray"): "_safe_bytearray",
    ("builtins", "set"): "_safe_set",
    ("builtins", "frozenset"): "_safe_frozenset",
    ("collections", "OrderedDict"): "_safe_ordered_dict",
    ("_codecs", "encode"): "_safe_encode",
    ("numpy", "ndarray"): _NDARRAY,
}


def allowed_names(allow: Iterable[object]) -> dict[tuple[str, str], Any]:
    """The default safe names plus the classes (or functions) in ``allow``."""
    names = dict(_SAFE_NAMES)
    for obj in allow:
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str):
            raise TypeError(
                f"allow= takes classes (or functions) to permit when unpickling, "
                f"got {obj!r}"
            )
        names[(module, qualname)] = obj
    return names


def _classes(allow: Iterable[object]) -> frozenset[type]:
    return frozenset(obj for obj in allow if isinstance(obj, type))


def _stored_size(data: Any, buffers: Any) -> int:
    size = memoryview(data).nbytes
    if buffers:
        size += sum(memoryview(buffer).nbytes for buffer in buffers)
    return size


def make_loads(safe: bool, allow: Iterable[object] = ()) -> Loads:
    """A ``loads(data, buffers=None)`` that no file can crash; restricted if ``safe``.

    >>> loads = make_loads(safe=True)
    >>> loads(pickle.dumps({"a": [1, 2.5, None], "b": np.int16(3)}))
    {'a': [1, 2.5, None], 'b': np.int16(3)}
    >>> loads(pickle.dumps(print))
    Traceback (most recent call last):
    ...
    mlworkflow_async._store._safe_unpickler.ForbiddenGlobal: builtins.print
    """
    if not safe:
        return _trusted_loads
    allow = tuple(allow)
    names, classes = allowed_names(allow), _classes(allow)

    def restricted_loads(data: Any, buffers: Any = None) -> Any:
        size = _stored_size(data, buffers)
        budget = BUILD_FACTOR * size + BUILD_SLACK
        return _Careful(
            io.BytesIO(data), buffers, names=names, classes=classes, budget=budget, size=size
        ).load()

    return restricted_loads


def _trusted_loads(data: Any, buffers: Any = None) -> Any:
    if not _sets_numpy_state(data):
        return pickle.loads(data, buffers=buffers)
    size = _stored_size(data, buffers)
    if _OBJECTS(data) is not None:
        return _Careful(
            io.BytesIO(data), buffers, names=None, classes=frozenset(), budget=math.inf,
            size=size,
        ).load()
    return _Checked(io.BytesIO(data), buffers).load()


def load_plain_int(data: bytes) -> tuple[int, int]:
    """Unpickle an ``int`` at the start of ``data``; return it and its pickle's size.

    No name may be imported, so this is safe on any bytes; anything but an
    int raises ``pickle.UnpicklingError`` (or ``EOFError``/``ValueError``).
    """
    stream = io.BytesIO(data)
    value = _Careful(
        stream, None, names={}, classes=frozenset(), budget=BUILD_SLACK, size=len(data)
    ).load()
    if type(value) is not int:
        raise pickle.UnpicklingError(f"expected an int, found {type(value).__name__}")
    return value, stream.tell()


def load_consecutive(data: bytes, safe: bool, allow: Iterable[object], limit: int) -> list[Any]:
    """Unpickle up to ``limit`` pickles written one after the other in ``data``."""
    stream = io.BytesIO(data)
    unpickler: Any
    if safe:
        allow = tuple(allow)
        unpickler = _Careful(
            stream, None, names=allowed_names(allow), classes=_classes(allow),
            budget=BUILD_FACTOR * len(data) + BUILD_SLACK, size=len(data),
        )
    elif _sets_numpy_state(data):
        unpickler = _Careful(
            stream, None, names=None, classes=frozenset(), budget=math.inf, size=len(data)
        )
    else:
        unpickler = pickle.Unpickler(stream)
    objects: list[Any] = []
    while len(objects) < limit and stream.tell() < len(data):
        objects.append(unpickler.load())
        unpickler.memo.clear()
    return objects
