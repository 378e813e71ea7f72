"""The Dataset contract: subclassing rules, queries, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mlworkflow_async import Dataset, DictDataset, Subset
from tests.conftest import wait_until


def test_plain_def_query_item_fails_at_class_definition() -> None:
    with pytest.raises(TypeError) as info:

        class Blocking(Dataset[int, int]):  # pragma: no cover - never instantiated
            def yield_keys(self) -> list[int]:
                return [1]

            def query_item(self, key: int) -> int:  # type: ignore[override]
                return key

    message = str(info.value)
    assert "Blocking.query_item" in message
    assert "async def" in message
    assert "from_sync" in message


def test_yield_keys_may_be_a_plain_generator() -> None:
    class Gen(Dataset[int, int]):
        def yield_keys(self):  # type: ignore[no-untyped-def]
            yield from range(3)

        async def query_item(self, key: int) -> int:
            return -key

    ds = Gen()
    assert ds.sync.keys.all() == [0, 1, 2]
    assert len(ds) == 3


async def test_query_and_query_items() -> None:
    ds = DictDataset({1: {"x": 1.0}, 2: {"x": 2.0}})
    assert await ds.query_items([2, 1]) == [{"x": 2.0}, {"x": 1.0}]
    batch = await ds.query([1, 2])
    np.testing.assert_array_equal(batch["x"], [1.0, 2.0])
    assert await ds.query([1, 2], collate_fn=len) == 2


async def test_default_query_items_runs_concurrently_and_names_failing_key() -> None:
    started = 0
    release = asyncio.Event()

    class Slow(Dataset[int, int]):
        def yield_keys(self) -> list[int]:
            return list(range(5))

        async def query_item(self, key: int) -> int:
            nonlocal started
            started += 1
            await release.wait()
            if key == 3:
                raise ValueError("bad item")
            return key

    ds = Slow()
    task = asyncio.create_task(ds.query_items([0, 1, 2]))
    await wait_until(lambda: started == 3)  # all three in flight at once
    release.set()
    assert await task == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item") as info:
        await ds.query_items([2, 3, 4])
    assert any("key 3" in note for note in info.value.__notes__)


async def test_missing_key_errors_name_the_key() -> None:
    ds = DictDataset({"a": 1})
    with pytest.raises(KeyError, match="'zz'"):
        await ds.query_item("zz")
    sub = Subset(ds, ["a"])
    with pytest.raises(KeyError, match="'b'"):
        await sub.query_item("b")


async def test_subset_keeps_given_order_and_length() -> None:
    parent = DictDataset({i: i * i for i in range(10)})
    sub = Subset(parent, [7, 2, 5])
    assert len(sub) == 3
    assert await sub.keys.all() == [7, 2, 5]
    assert [b.tolist() async for _, b in sub.batches(2)] == [[49, 4], [25]]
