"""AugmentedDataset: sync and async augment, fetch-once, concurrency, bounds, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from mlworkflow_async import AugmentedDataset, DictDataset, KeysNotReadyError
from tests._datasets import Counting
from tests.conftest import wait_until

SEED = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f"}


class PermutingDataset(AugmentedDataset[Any, str]):
    def augment(self, root_key: Any, root_item: str) -> Iterator[tuple[Any, str]]:
        yield (root_key, 0), root_item + "a"
        yield (root_key, 1), root_item + "b"


class AsyncPermuting(AugmentedDataset[Any, str]):
    async def augment(  # type: ignore[override]
        self, root_key: Any, root_item: str
    ) -> AsyncIterator[tuple[Any, str]]:
        for suffix in "ab":
            await asyncio.sleep(0)
            yield (root_key, suffix), root_item + suffix


async def all_items(dataset: AugmentedDataset[Any, Any]) -> list[Any]:
    return [await dataset.query_item(key) async for key in dataset.keys]


async def test_seed_example() -> None:
    dataset = PermutingDataset(DictDataset(SEED))
    expected = ["aa", "ab", "ba", "bb", "ca", "cb", "da", "db", "ea", "eb", "fa", "fb"]
    assert await all_items(dataset) == expected
    assert (await dataset.keys.all())[:3] == [(1, 0), (1, 1), (2, 0)]


async def test_async_augment() -> None:
    dataset = AsyncPermuting(DictDataset(SEED))
    assert await all_items(dataset) == [c + s for c in "abcdef" for s in "ab"]
    assert await dataset.query_items([(6, "b"), (1, "a")]) == ["fb", "aa"]


async def test_zero_one_or_many_children() -> None:
    class Repeat(AugmentedDataset[Any, str]):
        def augment(self, root_key: int, root_item: str) -> Iterator[tuple[Any, str]]:
            for i in range(root_key % 3):
                yield (root_key, i), root_item * (i + 1)

    dataset = Repeat(DictDataset(SEED))
    assert await dataset.keys.all() == [(1, 0), (2, 0), (2, 1), (4, 0), (5, 0), (5, 1)]
    assert await all_items(dataset) == ["a", "b", "bb", "d", "e", "ee"]


async def test_keys_then_children_in_order_fetch_each_root_once() -> None:
    parent = Counting({i: str(i) for i in range(50)})
    dataset = PermutingDataset(parent)
    async for key in dataset.keys:
        await dataset.query_item(key)
    assert len(parent.fetches) == 50
    assert set(parent.fetches.values()) == {1}


async def test_batches_fetch_each_root_once() -> None:
    parent = Counting({i: str(i) for i in range(300)})
    dataset = PermutingDataset(parent)
    seen = []
    async for _, batch in dataset.batches(16, wrapper=list):
        seen.extend(batch)
    assert seen == [f"{i}{s}" for i in range(300) for s in "ab"]
    assert set(parent.fetches.values()) == {1}


async def test_concurrent_queries_of_one_root_share_one_fetch() -> None:
    gate = asyncio.Event()
    parent = Counting(SEED, gate=gate)
    dataset = PermutingDataset(parent)
    keys = [(3, 0), (3, 1)] * 5
    tasks = [asyncio.create_task(dataset.query_item(key)) for key in keys]
    await wait_until(lambda: parent.waiting == 1)
    await asyncio.sleep(0)  # every task has reached its wait by now
    assert parent.fetches == {3: 1}
    gate.set()
    assert await asyncio.gather(*tasks) == ["ca", "cb"] * 5
    assert parent.fetches == {3: 1}
    # A batch asking for that root and another one fetches only the other.
    assert await dataset.query_items([(3, 1), (4, 0)]) == ["cb", "da"]
    assert parent.fetches == {3: 1, 4: 1}


async def test_failed_root_fetch_reaches_every_waiter_and_is_not_kept() -> None:
    gate = asyncio.Event()
    parent = Counting(SEED, gate=gate)
    dataset = PermutingDataset(parent)
    tasks = [asyncio.create_task(dataset.query_item((9, i))) for i in range(3)]
    await wait_until(lambda: parent.waiting == 1)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, KeyError) for result in results)
    assert parent.fetches[9] == 1
    parent.mapping[9] = "z"
    assert await dataset.query_item((9, 1)) == "zb"


async def test_unknown_child_names_child_and_root() -> None:
    dataset = PermutingDataset(DictDataset(SEED))
    with pytest.raises(KeyError, match=r"\(2, 7\) is not a key.*root key 2"):
        await dataset.query_item((2, 7))
    with pytest.raises(KeyError, match=r"\(2, 7\) is not a key"):
        await dataset.query_items([(1, 0), (2, 7)])
    with pytest.raises(KeyError, match="42"):
        await dataset.query_item((42, 0))


async def test_custom_root_key() -> None:
    class Split(AugmentedDataset[str, str]):
        def augment(self, root_key: int, root_item: str) -> Iterator[tuple[str, str]]:
            for i, char in enumerate(root_item):
                yield f"{root_key}/{i}", char

        def root_key(self, key: str) -> int:
            return int(key.split("/")[0])

    dataset = Split(DictDataset({1: "xy", 2: "z"}))
    assert await dataset.keys.all() == ["1/0", "1/1", "2/0"]
    assert await dataset.query_item("1/1") == "y"
    assert await dataset.query_items(["2/0", "1/0"]) == ["z", "x"]


async def test_root_key_that_does_not_match_augment_fails_clearly() -> None:
    class Mismatch(AugmentedDataset[Any, str]):
        def augment(self, root_key: int, root_item: str) -> Iterator[tuple[Any, str]]:
            yield ("x", root_key), root_item

    with pytest.raises(ValueError, match=r"made child key \('x', 1\) from root key 1.*root_key"):
        await Mismatch(DictDataset(SEED)).keys.all()


async def test_augment_errors_name_the_root() -> None:
    class Broken(AugmentedDataset[Any, str]):
        def augment(self, root_key: int, root_item: str) -> Iterator[tuple[Any, str]]:
            if root_key == 4:
                raise RuntimeError("cannot augment")
            yield (root_key, 0), root_item

    dataset = Broken(DictDataset(SEED))
    for attempt in (dataset.query_item((4, 0)), dataset.keys.all()):
        with pytest.raises(RuntimeError, match="cannot augment") as info:
            await attempt
        assert any("root key 4" in note for note in info.value.__notes__)

    class RaisesTypeError(AugmentedDataset[Any, str]):
        def augment(self, root_key: int, root_item: str) -> Iterator[tuple[Any, str]]:
            raise TypeError("a bug inside augment")

    with pytest.raises(TypeError, match="a bug inside augment"):
        await RaisesTypeError(DictDataset(SEED)).keys.all()

    class NotAGenerator(AugmentedDataset[Any, str]):
        def augment(self, root_key: int, root_item: str) -> Any:
            return 3

    for attempt in (
        NotAGenerator(DictDataset(SEED)).query_item((1, 0)),
        NotAGenerator(DictDataset(SEED)).keys.all(),
    ):
        with pytest.raises(TypeError, match="returned int; it must be a generator") as info:
            await attempt
        assert any("root key 1" in note for note in info.value.__notes__)


async def test_memory_is_bounded() -> None:
    parent = Counting({i: str(i) for i in range(60)})
    dataset = PermutingDataset(parent, cached_roots=4)
    keys = await dataset.keys.all()
    assert len(keys) == 120
    assert set(parent.fetches.values()) == {1}
    # The first roots were let go: their children need the root again.
    assert await dataset.query_item((0, 1)) == "0b"
    assert parent.fetches[0] == 2
    # Children are still served in order with one fetch per root.
    before = parent.total
    expected = [f"{root}{'ab'[index]}" for root, index in keys[2:40]]
    assert await dataset.query_items(list(keys[2:40])) == expected
    assert parent.total - before <= 20
    with pytest.raises(ValueError, match="cached_roots"):
        PermutingDataset(parent, cached_roots=0)


async def test_query_items_fetches_missing_roots_in_one_parent_call() -> None:
    parent = Counting(SEED, bulk=True)
    dataset = PermutingDataset(parent)
    assert dataset.batched_queries
    items = await dataset.query_items([(2, 0), (5, 1), (2, 1), (6, 0)])
    assert items == ["ba", "eb", "bb", "fa"]
    assert parent.bulk_calls == [[2, 5, 6]]


async def test_len_only_once_own_keys_are_complete() -> None:
    dataset = PermutingDataset(DictDataset(SEED))
    with pytest.raises(KeysNotReadyError):
        len(dataset)
    async for _ in dataset.keys:
        break
    with pytest.raises(KeysNotReadyError):
        len(dataset)
    await dataset.keys.all()
    assert len(dataset) == 12


async def test_context_is_the_parents() -> None:
    assert PermutingDataset(Counting(SEED, context=[1, 2])).context == [1, 2]
    assert PermutingDataset(DictDataset(SEED)).context is None


def test_blocking_view_and_successive_event_loops() -> None:
    dataset = AsyncPermuting(DictDataset(SEED))
    assert asyncio.run(dataset.query_item((2, "a"))) == "ba"
    assert dataset.sync.keys.all()[-1] == (6, "b")
    assert len(dataset) == 12
    assert asyncio.run(dataset.query_items([(6, "a")])) == ["fa"]


async def test_failure_deep_in_key_discovery_names_its_root() -> None:
    class BreaksAt(AugmentedDataset[Any, str]):
        def augment(self, root_key: int, root_item: str) -> Iterator[tuple[Any, str]]:
            yield (root_key, 0), root_item
            if root_key == 150:
                raise RuntimeError("cannot augment")
            yield (root_key, 1), root_item

    dataset = BreaksAt(DictDataset({i: str(i) for i in range(300)}))
    with pytest.raises(RuntimeError, match="cannot augment") as info:
        await dataset.keys.all()
    assert [note for note in info.value.__notes__ if "root key" in note] == [
        "while augmenting root key 150 in BreaksAt.augment()"
    ]
    assert (150, 0) not in dataset.keys.known  # a failed chunk adds no key


async def test_readers_in_step_and_repeated_queries_fetch_each_root_once() -> None:
    parent = Counting({i: str(i) for i in range(300)})
    dataset = PermutingDataset(parent)

    async def read() -> list[str]:
        return [await dataset.query_item(key) async for key in dataset.keys]

    expected = [f"{i}{s}" for i in range(300) for s in "ab"]
    assert await asyncio.gather(read(), read()) == [expected, expected]
    assert set(parent.fetches.values()) == {1}
    keys = dataset.keys.known
    assert await dataset.query_items(list(keys[-6:])) == expected[-6:]
    assert await dataset.query_item(keys[-1]) == expected[-1]
    assert set(parent.fetches.values()) == {1}
