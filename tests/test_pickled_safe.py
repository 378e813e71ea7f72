"""Safe mode: only builtins, numpy arrays and allowed classes; crafted files run nothing."""

from __future__ import annotations

import asyncio
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import (
    CorruptFileError,
    DictDataset,
    PickledDataset,
    UnsafePickleError,
)
from mlworkflow_async._store._safe_unpickler import _RECONSTRUCT, _SCALAR, BUILD_FACTOR

from ._pickled_util import Key, Point, RunsCommand, assert_same, read_in_subprocess

PLAIN: dict[str, Any] = {
    "containers": {"l": [1, 2], "t": (3, "x"), "s": {4}, "f": frozenset({5}), "b": b"raw",
                   "ba": bytearray(b"ba"), "c": complex(1, 2), "sl": slice(1, 2), "n": None},
    "arrays": (np.arange(5.0), np.zeros((2, 3), np.int8), np.asfortranarray(np.ones((2, 2))),
               np.array([(1, 2.0)], dtype="i4,f8"), np.array([(1, 2.0)], dtype=">i4,<f8"),
               np.zeros(2, dtype=np.dtype("i1,f8", align=True)),
               np.array(["2024-01-01"], dtype="M8[D]"), np.arange(6).reshape(2, 3)[:, ::2],
               np.array([b"ab", b"c"]), np.array(["x", "yz"]), np.zeros(3, ">u2")),
    "scalars": (np.float32(2.5), np.int16(-4), np.dtype("f4"), np.bool_(False),
                np.dtype("i4,f8"), np.bytes_(b"abc"), np.str_("ab"), np.int64(7).newbyteorder()
                if hasattr(np.int64(7), "newbyteorder") else np.uint8(3),
                np.datetime64("2024-01-02"), np.zeros(1, "i4,f8")[0]),
}


async def test_safe_mode_reads_builtins_and_numpy(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    await PickledDataset.create(DictDataset(PLAIN), path)
    async with await PickledDataset.open(path, safe=True) as ds:
        for key, item in zip(PLAIN, await ds.query_items(list(PLAIN)), strict=True):
            if key == "containers":
                assert item == PLAIN[key]
            else:
                assert_same(PLAIN[key], item)


async def test_classes_must_be_allowed(tmp_path: Path) -> None:
    path = tmp_path / "classes.pkl"
    items = {Key("p", 1): Point(1, 2), Key("q", 2): [1, 2]}
    await PickledDataset.create(DictDataset(items), path)
    with pytest.raises(UnsafePickleError, match=r"tests\._pickled_util\.Key.*allow="):
        PickledDataset(path, safe=True).yield_keys()  # the keys themselves need their class
    async with await PickledDataset.open(path, safe=True, allow=[Key]) as ds:
        assert await ds.query_item(Key("q", 2)) == [1, 2]
        with pytest.raises(UnsafePickleError, match=r"item Key\(name='p'.*_pickled_util\.Point"):
            await ds.query_item(Key("p", 1))
    with PickledDataset(path, safe=True, allow=(Key, Point)) as ds:
        assert await ds.query_item(Key("p", 1)) == Point(1, 2)


def test_allow_takes_classes() -> None:
    with pytest.raises(TypeError, match="allow="):
        PickledDataset("whatever.pkl", safe=True, allow=["os.system"])


async def test_crafted_item_runs_nothing_in_safe_mode(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    await PickledDataset.create(
        DictDataset({"fine": 1, "evil": RunsCommand(f"touch {marker}")}), path
    )
    for inline in (True, False):
        async with await PickledDataset.open(path, safe=True) as ds:
            ds._reader.inline = inline
            assert await ds.query_item("fine") == 1
            with pytest.raises(UnsafePickleError, match=r"item 'evil'.*(posix|os)\.system"):
                await ds.query_item("evil")
    assert not marker.exists()
    # The same file without safe mode does run the command: the test file is real.
    async with await PickledDataset.open(path) as ds:
        assert await ds.query_item("evil") == 0
    assert marker.exists()


async def test_crafted_keys_run_nothing_in_safe_mode(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_keys.pkl"

    # RunsCommand is hashable (by identity), so it can be a key.
    source = DictDataset({"ok": 1, RunsCommand(f"touch {marker}"): 2})
    await PickledDataset.create(source, path)
    with PickledDataset(path, safe=True) as ds:  # keys are unpickled only when asked for
        assert await ds.query_item("ok") == 1
        with pytest.raises(UnsafePickleError, match="keys or context"):
            ds.yield_keys()
    assert not marker.exists()


class CallsNdarray:
    """Unpickles to ``numpy.ndarray((1,), "O", buffer)``: an array of raw pointers."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return np.ndarray, ((1,), "O", b"\x10" * 8)


async def test_numpy_cannot_be_made_to_read_pointers(tmp_path: Path) -> None:
    path = tmp_path / "pointers.pkl"
    await PickledDataset.create(DictDataset({"bad": CallsNdarray()}), path)
    with PickledDataset(path, safe=True) as ds, pytest.raises(CorruptFileError, match="'bad'"):
        await ds.query_item("bad")
    crafted = pickle.dumps(np.arange(3))  # numpy's own reduction still loads safely
    from mlworkflow_async._store._safe_unpickler import make_loads

    np.testing.assert_array_equal(make_loads(True)(crafted), np.arange(3))


# -- crafted numpy states -------------------------------------------------------



class Craft:
    """Pickles as ``func(*args)``, then ``__setstate__(state)`` when ``state`` is given."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        if self.state is None:
            return self.func, self.args
        return self.func, self.args, self.state


def dtype_with(spec: str, state: tuple[Any, ...]) -> Craft:
    """A dtype as numpy pickles it, ``dtype(spec)``, with ``state`` set as-is."""
    return Craft(np.dtype, (spec, False, True), state)


OBJECT_DTYPE = dtype_with("O8", (3, "|", None, None, None, -1, -1, 63))
# Bytes 0-7 of each item claim to be a Python object (a pointer), the flags say
# "no objects": numpy would copy raw bytes into pointers and later follow them.
POINTER_FIELD = dtype_with(
    "V8", (3, "|", None, ("p",), {"p": (OBJECT_DTYPE, 0)}, 8, 1, 0)
)
FAR_FIELD = dtype_with(  # a field 1000 bytes past the end of each 4-byte item
    "V4", (3, "|", None, ("a",), {"a": (dtype_with("i8", (3, "<", None, None, None, -1, -1, 0)),
                                         1000)}, 4, 1, 16)
)
HOSTILE: dict[str, Any] = {
    # A string dtype claiming 4096 bytes: numpy's scalar() reads past its 8.
    "long_scalar": Craft(_SCALAR, (dtype_with("S8", (3, "|", None, None, None, 4096, 1, 0)),
                                   b"12345678")),
    "negative_size": Craft(_SCALAR, (dtype_with("S8", (3, "|", None, None, None, -1, 1, 0)),
                                     b"12345678")),
    "far_field": Craft(np.frombuffer, (b"\0" * 8, FAR_FIELD)),
    "pointers": Craft(_RECONSTRUCT, (np.ndarray, (0,), b"b"),
                      (1, (2,), POINTER_FIELD, False, b"\x10" * 16)),
    "pointer_scalar": Craft(_SCALAR, (POINTER_FIELD, b"\x10" * 8)),
    # numpy's _reconstruct leaves memory uninitialised: heap addresses as data.
    "uninitialised": Craft(_RECONSTRUCT, (np.ndarray, (64,), b"i8")),
    "shape_too_large": Craft(_RECONSTRUCT, (np.ndarray, (0,), b"b"),
                             (1, (1000,), np.dtype("i8"), False, b"\0" * 8)),
}


@pytest.mark.parametrize("key", list(HOSTILE))
def test_crafted_numpy_states_are_refused_in_every_mode(tmp_path: Path, key: str) -> None:
    path = tmp_path / f"{key}.pkl"
    asyncio.run(PickledDataset.create(DictDataset({key: HOSTILE[key], "fine": 1}), path))
    (result,) = read_in_subprocess([path], tmp_path)
    assert not result["messages"]
    outcomes = result["outcomes"]
    assert {outcomes[f"unsafe/{m}/{a}"] for m in ("read", "mmap")
            for a in ("item", "items", "batches")} == {"CorruptFileError"}, outcomes
    assert {outcomes[f"safe/{m}/{a}"] for m in ("read", "mmap")
            for a in ("item", "items", "batches")} <= {"CorruptFileError", "UnsafePickleError"}


def test_flipped_byte_in_a_numpy_scalar_is_corrupt_in_every_mode(tmp_path: Path) -> None:
    # Numpy pickles a scalar as dtype("i8") plus a state; "a8" has no size of its own.
    path = tmp_path / "flipped.pkl"
    asyncio.run(PickledDataset.create(DictDataset({"n": np.int64(5)}), path))
    data = path.read_bytes()
    assert data.count(b"i8") == 1
    path.write_bytes(data.replace(b"i8", b"a8"))
    (result,) = read_in_subprocess([path], tmp_path)
    assert not result["messages"]
    assert set(result["outcomes"].values()) == {"CorruptFileError"}, result["outcomes"]


ALLOCATES = {
    "bytearray": Craft(bytearray, (1_500_000_000,)),
    "frozenset_of_range": Craft(frozenset, (Craft(range, (30_000_000,)),)),
    "object_array": Craft(_RECONSTRUCT, (np.ndarray, (300_000_000,), OBJECT_DTYPE)),
    "repeated": [Craft(bytearray, (BUILD_FACTOR << 20,))] * 8,
}


@pytest.mark.parametrize("key", list(ALLOCATES))
async def test_a_small_item_cannot_build_a_large_object(tmp_path: Path, key: str) -> None:
    path = tmp_path / "big.pkl"
    await PickledDataset.create(DictDataset({key: ALLOCATES[key]}), path)
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        async with await PickledDataset.open(path, safe=True) as ds:
            with pytest.raises(UnsafePickleError, match=f"item '{key}'"):
                await ds.query_item(key)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20


def test_keys_are_counted_before_they_are_built(tmp_path: Path) -> None:
    from .test_pickled_corrupt import rebuild_index

    path = tmp_path / "keys.pkl"
    asyncio.run(PickledDataset.create(DictDataset({"a": 1}), path, format_version=1))
    rebuild_index(path, lambda index: index.update(keys=range(20_000_000)))
    assert path.stat().st_size < 400
    with pytest.raises(UnsafePickleError, match=r"builtins\.range"):
        PickledDataset(path, safe=True)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match="1 table rows for no keys"):
            PickledDataset(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20


async def test_objects_and_ranges_are_refused_in_safe_mode(tmp_path: Path) -> None:
    path = tmp_path / "objects.pkl"
    items = {"objects": np.array([1, "x"], dtype=object), "range": range(3),
             "fields": np.zeros(2, dtype=[("a", "O"), ("b", "i4")])}
    await PickledDataset.create(DictDataset(items), path)
    async with await PickledDataset.open(path, safe=True) as ds:
        with pytest.raises(UnsafePickleError, match="Python objects"):
            await ds.query_item("objects")
        with pytest.raises(UnsafePickleError, match="Python objects"):
            await ds.query_item("fields")
        with pytest.raises(UnsafePickleError, match=r"builtins\.range"):
            await ds.query_item("range")
    async with await PickledDataset.open(path) as ds:  # a trusted file reads them all
        for key, item in zip(items, await ds.query_items(list(items)), strict=True):
            if key == "range":
                assert item == items[key]
            else:
                assert_same(items[key], item)
