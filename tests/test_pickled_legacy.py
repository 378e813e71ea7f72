"""Files written by the original mlworkflow 0.6 are read, and converted, as they are."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import mlworkflow
import numpy as np
import pytest

from mlworkflow_async import PickledDataset, UnsafePickleError

from ._pickled_util import Key, assert_same, write_original_file

ITEMS: dict[Any, Any] = {
    Key("img", i): {"image": np.full((4, 5), i, dtype=np.uint8), "label": i % 3, "name": f"n{i}"}
    for i in range(40)
}
ITEMS[Key("other", 0)] = ("tuple", 1.5, None, [1, 2])


def write_original(path: Path, context: dict[str, Any] | None) -> None:
    write_original_file(path, ITEMS, context)
    # The original reads its own file back: the fixture is genuine.
    assert len(mlworkflow.PickledDataset(str(path))) == len(ITEMS)


@pytest.mark.parametrize("context", [{"split": "val", "classes": ["a", "b"]}, None])
async def test_reads_original_files_with_their_context(tmp_path: Path, context: Any) -> None:
    path = tmp_path / "original.pkl"
    write_original(path, context)
    async with await PickledDataset.open(path) as ds:
        assert ds.format_version == 0
        assert "original mlworkflow" in repr(ds)
        assert ds.context == (context or {})
        assert await ds.keys.all() == list(ITEMS)
        keys = list(ITEMS)[::-1]
        for key, item in zip(keys, await ds.query_items(keys), strict=True):
            assert_same(ITEMS[key], item)
        ds._reader.inline = False  # the worker thread path reads them alike
        assert_same(ITEMS[keys[3]], await ds.query_item(keys[3]))
        labels = [batch["label"].tolist() async for _, batch in ds.batches(8, keys=keys[1:])]
        assert [x for batch in labels for x in batch] == [ITEMS[k]["label"] for k in keys[1:]]


async def test_original_files_in_mmap_and_safe_modes(tmp_path: Path) -> None:
    path = tmp_path / "original.pkl"
    write_original(path, {"c": 1})
    with PickledDataset(path, mmap=True) as ds:
        assert_same(ITEMS[Key("img", 7)], await ds.query_item(Key("img", 7)))
    with pytest.raises(UnsafePickleError, match="Key"):
        PickledDataset(path, safe=True)
    with PickledDataset(path, safe=True, allow=[Key]) as ds:
        assert_same(ITEMS[Key("other", 0)], await ds.query_item(Key("other", 0)))


async def test_convert_an_original_file(tmp_path: Path) -> None:
    old, new = tmp_path / "old.pkl", tmp_path / "new.pkl"
    write_original(old, {"origin": "0.6"})
    with PickledDataset(old) as source:
        assert await PickledDataset.create(source, new) == len(ITEMS)
    async with await PickledDataset.open(new) as ds:
        assert ds.format_version == 2
        assert ds.context == {"origin": "0.6"}
        keys = list(ITEMS)
        for key, item in zip(keys, await ds.query_items(keys), strict=True):
            assert_same(ITEMS[key], item)


def test_our_files_never_look_like_original_ones(tmp_path: Path) -> None:
    # Original files start with a pickle's PROTO opcode; the formats are told apart by it.
    path = tmp_path / "ours.pkl"
    from mlworkflow_async import DictDataset

    asyncio.run(PickledDataset.create(DictDataset({1: 2}), path))
    assert path.read_bytes()[:1] != b"\x80"
