"""Safe mode: only builtins, numpy arrays and allowed classes; crafted files run nothing."""

from __future__ import annotations

import pickle
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

from ._pickled_util import Key, Point, RunsCommand, assert_same

PLAIN: dict[str, Any] = {
    "containers": {"l": [1, 2], "t": (3, "x"), "s": {4}, "f": frozenset({5}), "b": b"raw",
                   "ba": bytearray(b"ba"), "c": complex(1, 2), "r": range(3), "n": None},
    "arrays": (np.arange(5.0), np.zeros((2, 3), np.int8), np.asfortranarray(np.ones((2, 2))),
               np.array([1, "x"], dtype=object), np.array([(1, 2.0)], dtype="i4,f8"),
               np.array(["2024-01-01"], dtype="M8[D]")),
    "scalars": (np.float32(2.5), np.int16(-4), np.dtype("f4"), np.bool_(False)),
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
