"""batchify and chunkify."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from mlworkflow_async import (
    Dataset,
    DictDataset,
    PickledDataset,
    TransformedDataset,
    batchify,
    chunkify,
)


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


class Unlucky(Exception):
    """What :func:`no_fives` raises, of a type of its own."""


raised: list[BaseException] = []


def no_fives(items: list[int]) -> list[int]:
    if 50 in items:
        error = Unlucky("no fives")
        raised.append(error)
        raise error
    return items


class PerItem(Dataset[int, int]):
    def yield_keys(self) -> list[int]:
        return list(range(12))

    async def query_item(self, key: int) -> int:
        return key * 10


def collate_notes(exc: BaseException) -> list[str]:
    return [note for note in getattr(exc, "__notes__", []) if "while collating" in note]


async def pickled(tmp_path: Path) -> Dataset[int, int]:
    path = str(tmp_path / "items.pkl")
    await PickledDataset.create(DictDataset({k: k * 10 for k in range(12)}), path)
    return PickledDataset(path)


def close(ds: Dataset[int, int]) -> None:
    if isinstance(ds, PickledDataset):
        ds.close()


SOURCES = ["per item", "bulk", "combinator", "pickled"]


async def source(kind: str, tmp_path: Path) -> Dataset[int, int]:
    if kind == "per item":
        return PerItem()
    if kind == "bulk":
        return DictDataset({k: k * 10 for k in range(12)})
    if kind == "combinator":
        return TransformedDataset(PerItem(), [lambda key, item: item])
    return await pickled(tmp_path)


@pytest.mark.parametrize("kind", SOURCES)
async def test_a_failing_collate_fn_is_named_with_the_keys_of_its_batch(
    kind: str, tmp_path: Path
) -> None:
    ds = await source(kind, tmp_path)
    with pytest.raises(Unlucky) as info:
        async for _ in ds.batches(4, collate_fn=no_fives, concurrency=4):
            pass
    close(ds)
    assert info.value is raised[-1]  # the very exception, not wrapped
    assert collate_notes(info.value) == [
        "while collating the batch of keys [4, 5, 6, 7] with collate_fn no_fives"
    ]


@pytest.mark.parametrize("kind", SOURCES)
async def test_a_query_names_the_first_keys_of_a_batch_that_fails_to_collate(
    kind: str, tmp_path: Path
) -> None:
    ds = await source(kind, tmp_path)
    with pytest.raises(Unlucky) as info:
        await ds.query(list(range(12)), collate_fn=no_fives)
    assert collate_notes(info.value) == [
        "while collating the batch of keys [0, 1, 2, 3, 4, ...] (12 keys) with collate_fn "
        "no_fives"
    ]
    with pytest.raises(Unlucky) as info:
        await ds.query([5], collate_fn=no_fives, concurrency=2)
    assert collate_notes(info.value) == [
        "while collating the batch of keys [5] with collate_fn no_fives"
    ]
    close(ds)


def test_the_blocking_view_names_the_batch_that_fails_to_collate() -> None:
    with pytest.raises(Unlucky) as info:
        PerItem().sync.query([3, 5], collate_fn=no_fives)
    assert collate_notes(info.value) == [
        "while collating the batch of keys [3, 5] with collate_fn no_fives"
    ]
    with pytest.raises(Unlucky) as info:
        list(PerItem().sync.batches(3, collate_fn=no_fives))
    assert collate_notes(info.value) == [
        "while collating the batch of keys [3, 4, 5] with collate_fn no_fives"
    ]


async def test_the_default_collation_failing_is_named_too() -> None:
    ds = DictDataset({0: {"x": 1}, 1: {"y": 2}})
    with pytest.raises(ValueError, match="cannot collate item 1") as info:
        await ds.query([0, 1])
    assert collate_notes(info.value) == [
        "while collating the batch of keys [0, 1] with collate_fn batchify (the default)"
    ]
    with pytest.raises(ValueError, match="cannot collate item 1") as info:
        await ds.query([0, 1], wrapper=list)
    assert collate_notes(info.value) == [
        "while collating the batch of keys [0, 1] with collate_fn batchify (wrapper=list)"
    ]
