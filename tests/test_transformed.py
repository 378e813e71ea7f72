"""TransformedDataset: sync and async transforms, errors, keys and length of the parent."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import pytest

from mlworkflow_async import DictDataset, KeysNotReadyError, TransformedDataset
from tests._datasets import Counting, Endless

SEED = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f"}


async def test_seed_example() -> None:
    parent = DictDataset(SEED)
    dataset = TransformedDataset(parent, [lambda k, v: v.upper()])
    assert await dataset.query_item(3) == "C"
    assert await dataset.query_items([1, 6]) == ["A", "F"]


async def test_sync_and_async_transforms_apply_in_order() -> None:
    async def exclaim(key: int, item: str) -> str:
        await asyncio.sleep(0)
        return f"{item}!"

    dataset = TransformedDataset(DictDataset(SEED), [lambda k, v: v * k, exclaim])
    dataset.add_transform(lambda k, v: v.upper())
    assert await dataset.query_item(2) == "BB!"
    assert await dataset.query_items([3, 1]) == ["CCC!", "A!"]
    assert [batch for _, batch in [b async for b in dataset.batches(4, wrapper=list)]] == [
        ["A!", "BB!", "CCC!", "DDDD!"],
        ["EEEEE!", "FFFFFF!"],
    ]


async def test_add_transform_is_a_decorator_and_add_transforms_appends() -> None:
    dataset: TransformedDataset[int, Any] = TransformedDataset(DictDataset(SEED))
    assert await dataset.query_item(1) == "a"

    @dataset.add_transform
    async def twice(key: int, item: str) -> str:
        return item * 2

    assert callable(twice)
    assert await twice(0, "x") == "xx"
    dataset.add_transforms([lambda k, v: (k, v)])
    assert dataset.transforms[0] is twice
    assert len(dataset.transforms) == 2
    assert await dataset.query_item(4) == (4, "dd")
    with pytest.raises(TypeError, match="must be callable"):
        dataset.add_transform("upper")  # type: ignore[arg-type]


@pytest.mark.parametrize("as_async", [False, True])
async def test_transform_exception_propagates_with_key_and_transform(as_async: bool) -> None:
    def explode(key: int, item: str) -> str:
        if key == 5:
            raise ValueError("no fives")
        return item

    async def explode_async(key: int, item: str) -> str:
        return explode(key, item)

    transform = explode_async if as_async else explode
    dataset = TransformedDataset(DictDataset(SEED), [transform])
    for query in (dataset.query_item(5), dataset.query_items([4, 5, 6])):
        with pytest.raises(ValueError, match="no fives") as info:
            await query
        notes = info.value.__notes__
        assert any("key 5" in note for note in notes)
        assert any(transform.__name__ in note for note in notes)
    with pytest.raises(ValueError, match="no fives"):
        async for _ in dataset.batches(2):
            pass


async def test_sync_transform_returning_a_coroutine_says_to_declare_it_async() -> None:
    async def slow_upper(item: str) -> str:
        return item.upper()

    dataset = TransformedDataset(DictDataset(SEED), [lambda k, v: slow_upper(v)])
    with pytest.raises(TypeError, match=r"returned a coroutine for key 2.*async def"):
        await dataset.query_item(2)
    with pytest.raises(TypeError, match="returned a coroutine for key 1"):
        await dataset.query_items([1])


async def test_keys_and_length_are_the_parents() -> None:
    parent = DictDataset(SEED)
    dataset = TransformedDataset(parent, [lambda k, v: v])
    assert dataset.keys is parent.keys
    assert dataset.yield_keys() is parent.keys
    assert len(dataset) == 6  # as soon as the parent knows it

    endless = TransformedDataset(Endless(), [lambda k, v: v + 1])
    with pytest.raises(KeysNotReadyError):
        len(endless)
    assert await endless.keys.fill_to(3)
    assert endless.keys.known[:3] == (0, 1, 2)
    assert await endless.query_item(7) == 71


async def test_bulk_parent_stays_bulk() -> None:
    parent = Counting(SEED, bulk=True, context="ctx")
    dataset = TransformedDataset(parent, [lambda k, v: v + v])
    assert dataset.batched_queries
    assert dataset.context == "ctx"
    batches = [batch async for _, batch in dataset.batches(4, wrapper=list)]
    assert batches == [["aa", "bb", "cc", "dd"], ["ee", "ff"]]
    assert parent.bulk_calls == [[1, 2, 3, 4], [5, 6]]


def test_blocking_view() -> None:
    dataset = TransformedDataset(DictDataset(SEED), [lambda k, v: v.upper()])
    assert dataset.sync.query_item(3) == "C"
    assert dataset.sync.query([1, 2]).tolist() == ["A", "B"]


async def test_batch_failure_names_the_key_and_transform_that_failed() -> None:
    def halve(key: int, item: int) -> int:
        return item // 2

    def invert(key: int, item: int) -> float:
        return 10 / item

    dataset = TransformedDataset(DictDataset({i: i for i in range(10)}), [halve, invert])
    assert await dataset.query_items([4, 9]) == [5.0, 2.5]
    with pytest.raises(ZeroDivisionError) as info:
        await dataset.query_items([5, 4, 1, 3])  # 1 // 2 == 0
    notes = info.value.__notes__
    assert any("key 1 " in note for note in notes)
    assert any("invert" in note for note in notes)
    assert not any("halve" in note for note in notes)


async def test_every_coroutine_of_a_rejected_batch_is_closed() -> None:
    async def upper(item: str) -> str:
        return item.upper()

    dataset = TransformedDataset(DictDataset(SEED), [lambda k, v: upper(v) if k > 2 else v])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="returned a coroutine for key 3"):
            await dataset.query_items([1, 2, 3, 4, 5])
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
