"""batchify and chunkify."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

from mlworkflow_async import batchify, chunkify


class Sample(NamedTuple):
    image: list[int]
    label: int


class Record:
    def __init__(self, a: int, b: str) -> None:
        self.a, self.b = a, b

    def to_dict(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b}


def test_dicts_become_dict_of_columns() -> None:
    batch = batchify([{"x": np.zeros(3), "y": 1}, {"x": np.ones(3), "y": 2}])
    assert set(batch) == {"x", "y"}
    assert batch["x"].shape == (2, 3)
    np.testing.assert_array_equal(batch["y"], [1, 2])


def test_objects_with_to_dict_are_collated_as_dicts() -> None:
    batch = batchify([Record(1, "p"), Record(2, "q")], wrapper=list)
    assert batch == {"a": [1, 2], "b": ["p", "q"]}


def test_tuples_and_lists_become_tuples_of_columns() -> None:
    assert batchify([(1, "a"), (2, "b")], wrapper=list) == ([1, 2], ["a", "b"])
    cols = batchify([[1, 2.0], [3, 4.0]])
    assert isinstance(cols, tuple)
    np.testing.assert_array_equal(cols[1], [2.0, 4.0])


def test_namedtuple_keeps_its_type() -> None:
    batch = batchify([Sample([1, 2], 0), Sample([3, 4], 1)])
    assert isinstance(batch, Sample)
    assert batch.image.shape == (2, 2)
    np.testing.assert_array_equal(batch.label, [0, 1])


def test_other_items_are_wrapped_whole() -> None:
    np.testing.assert_array_equal(batchify([1, 2, 3]), [1, 2, 3])
    assert batchify(["a", "b"], wrapper=tuple) == ("a", "b")


def test_ndarray_wrapper_means_make_an_array() -> None:
    batch = batchify([{"v": 5}, {"v": 7}], wrapper=np.ndarray)
    assert isinstance(batch["v"], np.ndarray)
    np.testing.assert_array_equal(batch["v"], [5, 7])  # not an uninitialised (5, 7) array
    np.testing.assert_array_equal(batchify([3, 4], wrapper=np.ndarray), [3, 4])


def test_mismatched_items_are_reported() -> None:
    with pytest.raises(ValueError, match="item 1"):
        batchify([{"a": 1}, {"b": 2}])
    with pytest.raises(ValueError, match="item 2"):
        batchify([(1, 2), (3, 4), (5,)])


def test_empty_batch() -> None:
    assert batchify([], wrapper=list) == []


def test_chunkify() -> None:
    assert list(chunkify(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunkify(range(7), 3, drop_incomplete=True)) == [[0, 1, 2], [3, 4, 5]]
    assert list(chunkify([], 2)) == []
    with pytest.raises(ValueError, match="at least 1"):
        list(chunkify([1], 0))
