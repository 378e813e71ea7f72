"""Chains of combinators: laziness, depth, lengths, bulk parents, pickling."""

from __future__ import annotations

import asyncio
import pickle
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from mlworkflow_async import (
    AugmentedDataset,
    CachedDataset,
    Dataset,
    DictDataset,
    FilteredDataset,
    KeysNotReadyError,
    Subset,
    TransformedDataset,
)
from tests._datasets import Counting, Endless, EndlessAsync

SEED = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f"}


class PermutingDataset(AugmentedDataset[Any, Any]):
    def augment(self, root_key: Any, root_item: Any) -> Iterator[tuple[Any, Any]]:
        yield (root_key, 0), root_item
        yield (root_key, 1), root_item


def even(key: int) -> bool:
    return key % 2 == 0


def add_one(key: Any, item: int) -> int:
    return item + 1


def build_chain(parent: Dataset[Any, Any]) -> Dataset[Any, Any]:
    filtered = FilteredDataset(parent, even)
    transformed = TransformedDataset(filtered, [add_one])
    return CachedDataset(PermutingDataset(transformed))


@pytest.mark.parametrize("source", [Endless, EndlessAsync])
async def test_chains_over_endless_keys_are_lazy_and_stream(source: type) -> None:
    with anyio.fail_after(5):
        chain = build_chain(source())  # builds nothing
        pair_filtered = FilteredDataset(source(), lambda k, v: v % 3 == 0)
        async with chain.batches(4, wrapper=list) as batches:
            keys, batch = await anext(batches)
        assert keys == [(0, 0), (0, 1), (2, 0), (2, 1)]
        assert batch == [1, 1, 21, 21]
        async with pair_filtered.batches(3, wrapper=list) as batches:
            assert (await anext(batches))[1] == [0, 30, 60]
        with pytest.raises(KeysNotReadyError):
            len(chain)


async def test_seed_chain() -> None:
    parent = DictDataset(SEED)
    dataset = TransformedDataset(
        PermutingDataset(FilteredDataset(parent, lambda k, v: k % 2 == 0)),
        [lambda k, v: v.upper() + str(k[1])],
    )
    items = [await dataset.query_item(key) async for key in dataset.keys]
    assert items == ["B0", "B1", "D0", "D1", "F0", "F1"]


async def test_subset_of_filtered_and_filtered_of_augmented() -> None:
    filtered = FilteredDataset(DictDataset(SEED), lambda k, v: v != "d")
    subset = Subset(filtered, [5, 2])
    assert await subset.query([5, 2], wrapper=list) == ["e", "b"]
    with pytest.raises(KeyError):
        await Subset(filtered, [4]).query_item(4)  # in the subset, filtered out above

    augmented = PermutingDataset(Counting(SEED))
    second_children = FilteredDataset(augmented, lambda k: k[1] == 1)
    assert await second_children.keys.all() == [(k, 1) for k in SEED]
    assert await second_children.query_items([(3, 1), (6, 1)]) == ["c", "f"]
    with pytest.raises(KeyError, match=r"\(3, 0\)"):
        await second_children.query_item((3, 0))
    by_pair = FilteredDataset(augmented, lambda k, v: v in "ae")
    assert [await by_pair.query_item(k) async for k in by_pair.keys] == ["a", "a", "e", "e"]


async def test_deep_chain() -> None:
    dataset: Dataset[Any, Any] = DictDataset({i: i for i in range(200)})
    for depth in range(10):
        dataset = TransformedDataset(dataset, [lambda k, v: v + 1])
        dataset = FilteredDataset(dataset, lambda k, d=depth: k % (d + 2) != 1)
    keys = await dataset.keys.all()
    assert keys == [k for k in range(200) if all(k % (d + 2) != 1 for d in range(10))]
    assert await dataset.query_items(list(keys)) == [key + 10 for key in keys]
    assert len(dataset) == len(keys)
    items = [item async for _, batch in dataset.batches(2, wrapper=list) for item in batch]
    assert items == [key + 10 for key in keys]


async def test_lengths_along_a_chain() -> None:
    parent = DictDataset(SEED)
    filtered = FilteredDataset(parent, even)
    transformed = TransformedDataset(filtered, [add_one])
    cached = CachedDataset(TransformedDataset(parent, [add_one]))
    assert len(cached) == 6  # keys equal the parent's, known at once
    for dataset in (filtered, transformed):
        with pytest.raises(KeysNotReadyError):
            len(dataset)
    await transformed.keys.all()
    assert len(filtered) == len(transformed) == 3


async def test_bulk_backend_stays_bulk_through_a_chain() -> None:
    parent = Counting({i: i for i in range(12)}, bulk=True, context={"format": 1})
    chain = CachedDataset(TransformedDataset(FilteredDataset(parent, even), [add_one]))
    assert chain.batched_queries
    assert chain.context == {"format": 1}
    batches = [batch async for _, batch in chain.batches(3, wrapper=list)]
    assert batches == [[1, 3, 5], [7, 9, 11]]
    assert parent.bulk_calls == [[0, 2, 4], [6, 8, 10]]
    augmented = PermutingDataset(TransformedDataset(parent, [add_one]))
    assert augmented.context == {"format": 1}
    await augmented.keys.all()
    calls = len(parent.bulk_calls)
    assert await augmented.query_items([(11, 1), (11, 0)]) == [12, 12]
    assert len(parent.bulk_calls) - calls <= 1


def test_pickled_chain_keeps_working() -> None:
    chain = build_chain(DictDataset({i: i * 10 for i in range(20)}))
    keys = asyncio.run(chain.keys.all())
    copy = pickle.loads(pickle.dumps(chain))
    assert asyncio.run(copy.keys.all()) == keys
    assert copy.sync.query_items(list(keys[:3])) == [1, 1, 21]


def test_partially_read_keys_survive_successive_event_loops() -> None:
    chain = build_chain(EndlessAsync())

    async def first(n: int) -> list[Any]:
        keys = []
        async for key in chain.keys:
            keys.append(key)
            if len(keys) == n:
                break
        return keys

    assert asyncio.run(first(2)) == [(0, 0), (0, 1)]
    assert asyncio.run(first(6))[4:] == [(4, 0), (4, 1)]
    assert chain.sync.query_item((4, 1)) == 41


class CountingTwice(AugmentedDataset[Any, Any]):
    """Two children per root, counting how often each root is augmented."""

    def __init__(self, parent: Dataset[Any, Any], **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.augmented: Counter[Any] = Counter()

    def augment(self, root_key: Any, root_item: Any) -> Iterator[tuple[Any, Any]]:
        self.augmented[root_key] += 1
        yield (root_key, 0), root_item
        yield (root_key, 1), -root_item


def judged_chain(n: int, **kwargs: Any) -> tuple[CountingTwice, Counter[int]]:
    """The benchmark's chain, counting predicate calls per key and augment calls per root."""
    judged: Counter[int] = Counter()

    def keep(key: int) -> bool:
        judged[key] += 1
        return key % 4 != 0

    filtered = FilteredDataset(Counting({i: i for i in range(n)}), keep)
    return CountingTwice(TransformedDataset(filtered, [add_one]), **kwargs), judged


def source_of(chain: CountingTwice) -> Counting:
    source = chain.parent.parent.parent  # type: ignore[attr-defined]
    assert isinstance(source, Counting)
    return source


def expected_items(n: int) -> list[int]:
    return [item for i in range(n) if i % 4 for item in (i + 1, -(i + 1))]


@pytest.mark.parametrize(("batch_size", "cached_roots"), [(64, 128), (256, 128), (16, 4), (1, 2)])
async def test_batches_judge_each_key_and_augment_each_root_once(
    batch_size: int, cached_roots: int
) -> None:
    chain, judged = judged_chain(2000, cached_roots=cached_roots)
    items = [item async for _, batch in chain.batches(batch_size, wrapper=list) for item in batch]
    assert items == expected_items(2000)
    assert set(judged.values()) == {1}
    assert len(judged) == 2000
    assert set(chain.augmented.values()) == {1}
    assert len(chain.augmented) == 1500


async def test_slow_consumer_of_batches_still_augments_each_root_once() -> None:
    chain, judged = judged_chain(1000, cached_roots=2)
    items = []
    async for _, batch in chain.batches(32, wrapper=list, concurrency=200):
        items.extend(batch)
        for _ in range(5):  # let the workers run as far ahead as they may
            await asyncio.sleep(0)
    assert items == expected_items(1000)
    assert set(judged.values()) == {1}
    assert set(chain.augmented.values()) == {1}


async def test_keys_then_query_item_judge_each_key_and_augment_each_root_once() -> None:
    chain, judged = judged_chain(1000)
    items = [await chain.query_item(key) async for key in chain.keys]
    assert items == expected_items(1000)
    assert set(judged.values()) == {1}
    assert set(chain.augmented.values()) == {1}


def test_blocking_keys_then_query_item_judge_each_key_and_augment_each_root_once() -> None:
    # The blocking view reads keys far ahead (a chunk per round trip to the loop).
    chain, judged = judged_chain(1500)
    assert [chain.sync.query_item(key) for key in chain.sync.keys] == expected_items(1500)
    assert set(judged.values()) == {1}
    assert set(chain.augmented.values()) == {1}


async def test_keys_read_without_a_reader_hold_no_item() -> None:
    chain, _ = judged_chain(4_000, cached_roots=4)
    keys = await chain.keys.all()  # discovery runs with no reader claiming keys
    assert len(keys) == 6_000
    source = source_of(chain)
    assert set(source.fetches.values()) == {1}
    # Nothing was held for queries nobody announced: the last root is fetched again.
    assert await chain.query_items(list(keys[-2:])) == expected_items(4_000)[-2:]
    assert source.fetches[3_999] == 2
    assert sum(chain.augmented.values()) == 3_001


async def test_streams_claiming_many_keys_at_once_find_them_held() -> None:
    chain, judged = judged_chain(4_000, cached_roots=4)
    items = [item async for _, batch in chain.batches(1_000, wrapper=list) for item in batch]
    assert items == expected_items(4_000)
    assert set(judged.values()) == {1}
    assert set(chain.augmented.values()) == {1}


async def test_held_children_are_found_across_chunks_in_any_order() -> None:
    chain, _ = judged_chain(200)

    class Reader:
        pass

    reader = Reader()
    chain.keys.claim(reader, 40)  # a live reader: discovery holds what it may claim
    keys = await chain.keys.all()  # several chunks of discovery, the last ones held
    tail = list(keys[-70:])  # more than the last chunk
    expected = expected_items(200)[-70:]
    for order in (tail, tail[::-1], tail[1::2] + tail[::2], tail + tail[:3]):
        lookup = dict(zip(tail, expected, strict=True))
        assert await chain.query_items(order) == [lookup[key] for key in order]
    assert set(chain.augmented.values()) == {1}


class Gauge(Dataset[int, int]):
    """Records the most fetches in flight at once.

    Each fetch waits until ``bound`` fetches are in flight together (once):
    so every fetch the library starts at once is in flight at once, and a
    chain that starts more than ``bound`` shows it in ``most``.
    """

    def __init__(self, n: int, bound: int) -> None:
        self.n = n
        self.bound = bound
        self.in_flight = 0
        self.most = 0
        self.full: anyio.Event | None = None

    def yield_keys(self) -> list[int]:
        return list(range(self.n))

    async def query_item(self, key: int) -> int:
        if self.full is None:
            self.full = anyio.Event()
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            if self.in_flight >= self.bound:
                self.full.set()
            with anyio.fail_after(10):
                await self.full.wait()
            return key
        finally:
            self.in_flight -= 1


class Copies(AugmentedDataset[Any, Any]):
    def augment(self, root_key: Any, root_item: Any) -> Iterator[tuple[Any, Any]]:
        yield (root_key, 0), root_item
        yield (root_key, 1), root_item


def chains(gauge: Gauge) -> list[Dataset[Any, Any]]:
    return [
        TransformedDataset(gauge, [add_one]),
        TransformedDataset(FilteredDataset(CachedDataset(gauge), even), [add_one]),
        Subset(TransformedDataset(gauge, [add_one]), range(0, 32, 3)),
    ]


@pytest.mark.parametrize("chain", range(3))
@pytest.mark.parametrize("concurrency", [2, 3])
async def test_the_concurrency_of_batches_bounds_the_fetches_down_a_chain(
    chain: int, concurrency: int
) -> None:
    gauge = Gauge(32, concurrency)
    ds = chains(gauge)[chain]
    with anyio.fail_after(20):
        got = [k async for keys, _ in ds.batches(8, concurrency=concurrency) for k in keys]
    assert got == await ds.keys.all()
    assert gauge.most == concurrency


@pytest.mark.parametrize("chain", range(3))
async def test_the_concurrency_of_query_bounds_the_fetches_down_a_chain(chain: int) -> None:
    gauge = Gauge(32, 3)
    ds = chains(gauge)[chain]
    keys = await ds.keys.all()
    with anyio.fail_after(20):
        assert (await ds.query(keys, concurrency=3)).tolist() == [k + 1 for k in keys]
        assert await ds.query_items(keys, concurrency=3) == [k + 1 for k in keys]
    assert gauge.most == 3


async def test_the_concurrency_of_a_query_bounds_the_roots_an_augmented_dataset_fetches() -> None:
    gauge = Gauge(16, 2)
    ds = TransformedDataset(Copies(gauge), [add_one])
    keys = [(root, copy) for root in range(16) for copy in (0, 1)]
    with anyio.fail_after(20):
        assert await ds.query_items(keys, concurrency=2) == [root + 1 for root, _ in keys]
    assert gauge.most == 2


@pytest.mark.parametrize("chain", range(3))
def test_the_concurrency_of_the_blocking_view_bounds_the_fetches_down_a_chain(
    chain: int,
) -> None:
    gauge = Gauge(32, 3)
    ds = chains(gauge)[chain]
    keys = ds.sync.keys.all()
    assert ds.sync.query_items(keys, concurrency=3) == [k + 1 for k in keys]
    assert ds.sync.query(keys, concurrency=3).tolist() == [k + 1 for k in keys]
    assert [k for ks, _ in ds.sync.batches(8, concurrency=3) for k in ks] == keys
    assert gauge.most == 3


@pytest.mark.parametrize("options", [{}, {"shuffle": 1}], ids=repr)
@pytest.mark.parametrize("kind", ["augment", "pairs"])
async def test_the_concurrency_of_batches_bounds_what_key_discovery_fetches(
    kind: str, options: dict[str, Any]
) -> None:
    gauge = Gauge(40, 2)
    ds: Dataset[Any, Any] = (
        Copies(gauge) if kind == "augment"
        else FilteredDataset(gauge, lambda key, item: item % 2 == 0)
    )
    with anyio.fail_after(20):
        got = [k async for keys, _ in ds.batches(4, concurrency=2, **options) for k in keys]
    assert sorted(got) == sorted(await ds.keys.all())
    assert len(got) == (80 if kind == "augment" else 20)
    assert gauge.most == 2
