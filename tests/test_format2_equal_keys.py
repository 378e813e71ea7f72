"""Format 2 refuses keys that are equal in Python but spelled apart, as format 1 does.

``1`` and ``True`` (or ``1.0``) are one key to a dict, but their pickles
differ, so a file holding both would find only one of them by either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mlworkflow_async import Dataset, PickledDataset

from ._pickled_util import Key, leftovers


class Listed(Dataset[Any, Any]):
    """The given keys, in order; each item is its key's repr."""

    def __init__(self, keys: Sequence[Any]) -> None:
        self._listed = list(keys)

    def yield_keys(self) -> list[Any]:
        return self._listed

    async def query_item(self, key: Any) -> Any:
        return repr(key)


def create(keys: Sequence[Any], path: Path, version: int = 2) -> int:
    return asyncio.run(PickledDataset.create(Listed(keys), path, format_version=version))


PAIRS = [
    (1, True),
    (1, 1.0),
    (0, False),
    (("a", 1), ("a", True)),
    (Key("a", 1), ("a", 1)),
    (frozenset({1, "x"}), frozenset({1.0, "x"})),
    (2**40, float(2**40)),
]


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=repr)
@pytest.mark.parametrize("apart", [False, True], ids=["same chunk", "chunks apart"])
def test_equal_keys_spelled_apart_are_refused(
    tmp_path: Path, first: Any, second: Any, apart: bool
) -> None:
    filler = list(range(1000, 3000)) if apart else []  # ints: the numpy path, in chunks
    keys = [first, *filler, "other", second]
    path = tmp_path / "equal.pkl"
    with pytest.raises(ValueError, match="equal in Python") as info:
        create(keys, path)
    message = str(info.value)
    assert f"keys {first!r} and {second!r}" in message
    assert "equal.pkl" in message
    assert "unique" in message
    assert not path.exists()
    assert leftovers(str(tmp_path)) == []
    with pytest.raises(ValueError, match="appears twice"):  # as format 1 does
        create(keys, tmp_path / "one.pkl", version=1)


def test_unequal_keys_of_equal_hashes_are_kept(tmp_path: Path) -> None:
    keys = [-1, -2, "x", 2**32 + 5, 5, (1, 2), (2, 1), 0.5]
    assert hash(-1) == hash(-2)
    path = tmp_path / "kept.pkl"
    assert create(keys, path) == len(keys)
    with PickledDataset(path) as ds:
        assert ds.sync.query_items(keys) == list(map(repr, keys))
        assert ds.yield_keys() == keys


def test_true_duplicates_are_still_named_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"key 'a' appears twice"):
        create(["a", "b", "a"], tmp_path / "twice.pkl")


def test_unhashable_keys_are_still_written(tmp_path: Path) -> None:
    # Format 2 identifies keys by their bytes alone, so lists work as keys.
    path = tmp_path / "lists.pkl"
    assert create([[1], [True], [2]], path) == 3
    with PickledDataset(path) as ds:
        assert ds.sync.query_item([True]) == "[True]"
