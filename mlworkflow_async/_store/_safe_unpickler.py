"""Unpickling with a fixed list of importable names, for files not fully trusted.

A pickle names the functions and classes it needs by module and name; the
unpickler imports and calls them. Refusing every name not on a short list
stops a crafted file from running arbitrary code (``os.system``...).
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = [
    "ForbiddenGlobal",
    "Loads",
    "allowed_names",
    "load_consecutive",
    "load_plain_int",
    "make_loads",
]

Loads = Callable[..., Any]


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a name that is not allowed; the caller adds the context."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in safe mode, where it must not be called.

    ``numpy.ndarray(shape, dtype, buffer)`` with an object dtype would read
    pointers from the buffer; numpy's pickles only pass the class to
    ``_reconstruct``, which the wrapper below accepts.
    """

    def __repr__(self) -> str:
        return "numpy.ndarray (not callable when unpickling safely)"


_NDARRAY = _NdarrayToken()


def _numpy_names() -> dict[tuple[str, str], Any]:
    # What numpy's own pickles (of arrays, dtypes and scalars) refer to, under
    # the module names of numpy 1 (``numpy.core``) and 2 (``numpy._core``).
    core: Any = getattr(np, "_core", None)
    if core is None or not hasattr(core, "multiarray"):  # numpy 1.x
        import numpy.core as core
    reconstruct = core.multiarray._reconstruct

    def safe_reconstruct(subtype: object, shape: Any, dtype: Any) -> Any:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError(f"cannot rebuild an array of type {subtype!r}")
        return reconstruct(np.ndarray, shape, dtype)

    names: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): np.dtype,
        # Refuses object dtypes, so it cannot be made to read pointers.
        ("numpy", "frombuffer"): np.frombuffer,
    }
    for package in ("numpy.core", "numpy._core"):
        names[(f"{package}.multiarray", "_reconstruct")] = safe_reconstruct
        names[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        names[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return names


_BUILTIN_NAMES: dict[tuple[str, str], Any] = {
    ("builtins", cls.__name__): cls
    for cls in (complex, set, frozenset, bytearray, bytes, range, slice)
}
_BUILTIN_NAMES[("collections", "OrderedDict")] = collections.OrderedDict
# Protocol 2 pickles spell bytes as ``_codecs.encode(text, "latin1")``.
_BUILTIN_NAMES[("_codecs", "encode")] = codecs.encode

_DEFAULT_NAMES = {**_BUILTIN_NAMES, **_numpy_names()}


def allowed_names(allow: Iterable[object]) -> dict[tuple[str, str], Any]:
    """The default safe names plus the classes (or functions) in ``allow``."""
    names = dict(_DEFAULT_NAMES)
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


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(
        self, file: io.BytesIO, names: dict[tuple[str, str], Any], buffers: Any
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._names = names

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._names[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(module, name) from None


def make_loads(safe: bool, allow: Iterable[object] = ()) -> Loads:
    """A ``loads(data, buffers=None)``: plain ``pickle.loads``, or a restricted one.

    >>> loads = make_loads(safe=True)
    >>> loads(pickle.dumps({"a": [1, 2.5, None]}))
    {'a': [1, 2.5, None]}
    >>> loads(pickle.dumps(print))
    Traceback (most recent call last):
    ...
    mlworkflow_async._store._safe_unpickler.ForbiddenGlobal: builtins.print
    """
    if not safe:
        return pickle.loads
    names = allowed_names(allow)

    def restricted_loads(data: Any, buffers: Any = None) -> Any:
        return _RestrictedUnpickler(io.BytesIO(data), names, buffers).load()

    return restricted_loads


def load_plain_int(data: bytes) -> tuple[int, int]:
    """Unpickle an ``int`` at the start of ``data``; return it and its pickle's size.

    No name may be imported, so this is safe on any bytes; anything but an
    int raises ``pickle.UnpicklingError`` (or ``EOFError``/``ValueError``).
    """
    stream = io.BytesIO(data)
    value = _RestrictedUnpickler(stream, {}, None).load()
    if type(value) is not int:
        raise pickle.UnpicklingError(f"expected an int, found {type(value).__name__}")
    return value, stream.tell()


def load_consecutive(data: bytes, safe: bool, allow: Iterable[object], limit: int) -> list[Any]:
    """Unpickle up to ``limit`` pickles written one after the other in ``data``."""
    stream = io.BytesIO(data)
    unpickler: pickle.Unpickler = (
        _RestrictedUnpickler(stream, allowed_names(allow), None) if safe
        else pickle.Unpickler(stream)
    )
    objects: list[Any] = []
    while len(objects) < limit and stream.tell() < len(data):
        objects.append(unpickler.load())
        unpickler.memo.clear()
    return objects
