"""Turning lists of items into batches, and iterables into chunks.

>>> batchify([{"x": 1, "y": "a"}, {"x": 2, "y": "b"}])
{'x': array([1, 2]), 'y': array(['a', 'b'], dtype='<U1')}
>>> batchify([(1, "a"), (2, "b")], wrapper=list)
([1, 2], ['a', 'b'])
>>> list(chunkify(range(5), 2))
[[0, 1], [2, 3], [4]]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np

from ._callables import describe

__all__ = [
    "DEFAULT_COLLATE",
    "Collate",
    "batchify",
    "chunkify",
    "collate_batch",
    "make_collate",
    "name_batch",
]

T = TypeVar("T")
Wrapper = Callable[[list[Any]], Any]


def _resolve_wrapper(wrapper: Any) -> Wrapper:
    # ``np.ndarray(list)`` would build an uninitialised array *shaped* by the
    # list; whoever writes ``wrapper=np.ndarray`` means "make an ndarray".
    if wrapper is np.ndarray:
        return np.asarray
    return wrapper  # type: ignore[no-any-return]


def _as_mapping(item: Any) -> Mapping[str, Any] | None:
    if isinstance(item, Mapping):
        return item
    to_dict = getattr(item, "to_dict", None)
    if callable(to_dict):
        result = to_dict()
        if isinstance(result, Mapping):
            return result
    return None


def batchify(items: Sequence[Any], wrapper: Any = np.array) -> Any:
    """Collate ``items`` into one batch, column by column.

    - dicts (or objects with ``to_dict()``) give a dict of wrapped columns;
    - a NamedTuple gives the same NamedTuple type with wrapped fields;
    - other tuples and lists give a tuple of wrapped columns;
    - anything else gives ``wrapper(list_of_items)``.

    ``wrapper`` receives a list and defaults to :func:`numpy.array`;
    ``np.ndarray`` is accepted as a synonym for it.

    >>> from typing import NamedTuple
    >>> class Pair(NamedTuple):
    ...     a: int
    ...     b: int
    >>> batchify([Pair(1, 2), Pair(3, 4)], wrapper=list)
    Pair(a=[1, 3], b=[2, 4])
    """
    wrap = _resolve_wrapper(wrapper)
    if not items:
        return wrap([])
    first = items[0]
    if type(first) is dict:
        # The common case, kept cheap (C-level passes): plain dicts with the same fields.
        try:
            if set(map(len, items)) == {len(first)}:
                return {name: wrap(list(map(itemgetter(name), items))) for name in first}
        except (KeyError, TypeError):
            pass  # reported precisely below
    first_map = _as_mapping(first)
    if first_map is not None:
        columns: dict[Any, list[Any]] = {name: [] for name in first_map}
        for index, item in enumerate(items):
            mapping = first_map if index == 0 else _as_mapping(item)
            if mapping is None or mapping.keys() != first_map.keys():
                got = "not a mapping" if mapping is None else f"fields {sorted(map(str, mapping))}"
                raise ValueError(
                    f"cannot collate item {index}: expected fields "
                    f"{sorted(map(str, first_map))} like item 0, got {got}"
                )
            for name, value in mapping.items():
                columns[name].append(value)
        return {name: wrap(values) for name, values in columns.items()}
    if isinstance(first, (tuple, list)):
        width = len(first)
        for index, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != width:
                raise ValueError(
                    f"cannot collate item {index}: expected a sequence of {width} "
                    f"fields like item 0, got {item!r:.80}"
                )
        cols = [wrap(list(col)) for col in zip(*items, strict=True)]
        if isinstance(first, tuple) and hasattr(type(first), "_fields"):
            return type(first)(*cols)
        return tuple(cols)
    return wrap(list(items))


def chunkify(iterable: Iterable[T], n: int, drop_incomplete: bool = False) -> Iterator[list[T]]:
    """Yield lists of ``n`` consecutive elements; the last may be shorter.

    With ``drop_incomplete=True`` a shorter last chunk is dropped.
    """
    if n < 1:
        raise ValueError(f"chunk size must be at least 1, got {n}")
    chunk: list[T] = []
    for element in iterable:
        chunk.append(element)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk and not drop_incomplete:
        yield chunk


Collate = Callable[[list[Any]], Any]

#: Batches whose arrays total more bytes than this are collated in a worker
#: thread: copying them would hold the event loop for more than about a
#: millisecond, while a thread hop costs a tenth of that.
OFF_LOOP_BYTES = 4 << 20


def _default_collate(items: list[Any]) -> Any:
    return batchify(items)


#: The collation of ``batches()`` and ``query()`` when neither ``collate_fn``
#: nor ``wrapper`` is given: :func:`batchify` with :func:`numpy.array`.
#: Backends may recognise it (``collate is DEFAULT_COLLATE``) to build the
#: batch themselves, for instance by reading arrays straight into place.
DEFAULT_COLLATE: Collate = _default_collate


def make_collate(collate_fn: Collate | None, wrapper: Any) -> Collate:
    """The collation ``collate_fn`` names, else :func:`batchify` with ``wrapper``."""
    if collate_fn is not None:
        if not callable(collate_fn):
            raise TypeError(
                f"collate_fn must be a function of a list of items, got {collate_fn!r}"
            )
        return collate_fn
    if wrapper is np.array:
        return DEFAULT_COLLATE
    if not callable(wrapper):
        raise TypeError(
            f"wrapper must be a callable taking a list (such as np.array or list), "
            f"got {wrapper!r}"
        )

    def collate(items: list[Any]) -> Any:
        return batchify(items, wrapper)

    collate.__qualname__ = f"batchify (wrapper={describe(wrapper)})"  # for error notes
    return collate


def _array_bytes(item: Any) -> int:
    if isinstance(item, np.ndarray):
        return item.nbytes
    if isinstance(item, dict):
        values: Iterable[Any] = item.values()
    elif isinstance(item, (tuple, list)):
        values = item
    else:
        return 0
    return sum(value.nbytes for value in values if isinstance(value, np.ndarray))


async def collate_batch(items: list[Any], collate: Collate) -> Any:
    """``collate(items)``, in a worker thread when the items hold large arrays.

    What ``collate`` raises is marked for :func:`name_batch`, which a caller
    knowing the batch's keys calls (a backend's ``query_batch`` does not).
    """
    try:
        if items and _array_bytes(items[0]) * len(items) > OFF_LOOP_BYTES:
            return await anyio.to_thread.run_sync(collate, items)
        return collate(items)
    except Exception as exc:
        with contextlib.suppress(AttributeError, TypeError):
            exc._mlworkflow_async_collate = collate  # type: ignore[attr-defined]
        raise


#: Keys of a batch named in full in an error's note; more are counted.
_KEYS_NAMED = 5


def name_batch(exc: BaseException, keys: Sequence[Any]) -> None:
    """Note on ``exc``, if a ``collate`` of :func:`collate_batch` raised it, the batch's
    keys and the collate_fn, once. The exception itself is left as it is."""
    collate = getattr(exc, "_mlworkflow_async_collate", None)
    if collate is None:
        return
    del exc._mlworkflow_async_collate  # type: ignore[attr-defined]
    shown = ", ".join(map(repr, keys[:_KEYS_NAMED]))
    more = f", ...] ({len(keys)} keys)" if len(keys) > _KEYS_NAMED else "]"
    name = "batchify (the default)" if collate is DEFAULT_COLLATE else describe(collate)
    exc.add_note(f"while collating the batch of keys [{shown}{more} with collate_fn {name}")
