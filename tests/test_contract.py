"""The one fetch contract: a subclass's query_item is respected by every path, and bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mlworkflow_async import (
    AugmentedDataset,
    CachedDataset,
    Dataset,
    DictDataset,
    FilteredDataset,
    PickledDataset,
    Subset,
    TransformedDataset,
)

SEED = {i: f"item{i}" for i in range(10)}


class Shouting(DictDataset[int, str]):
    """A DictDataset whose query_item changes the item: every path must give this."""

    async def query_item(self, key: int) -> str:
        return (await super().query_item(key)).upper()


async def every_answer(ds: Dataset[int, Any], keys: list[int], tmp_path: Path) -> list[Any]:
    """What each way of reading ``keys`` of ``ds`` gives, in the same shape."""
    answers: list[Any] = [
        [await ds.query_item(key) for key in keys],
        await ds.query_items(keys),
        list(await ds.query(keys, collate_fn=list)),
        [item async for _, batch in ds.batches(3, keys=keys, wrapper=list) for item in batch],
        await in_completion_order(ds, keys),
        await FilteredDataset(ds, lambda key, item: True).query_items(keys),
        await TransformedDataset(ds, [lambda key, item: item]).query_items(keys),
        await Subset(ds, keys).query_items(keys),
    ]
    cached = await CachedDataset(Subset(ds, keys)).fill()
    answers.append([cached.cache[key] for key in keys])
    path = tmp_path / f"{type(ds).__name__}.pkl"
    await PickledDataset.create(ds, path, keys)
    with PickledDataset(path) as stored:
        answers.append(await stored.query_items(keys))
    return answers


async def in_completion_order(ds: Dataset[int, Any], keys: list[int]) -> list[Any]:
    """The items of ``batches(ordered=False)``, put back in key order."""
    by_keys = {
        tuple(batch_keys): batch
        async for batch_keys, batch in ds.batches(2, keys=keys, wrapper=list, ordered=False)
    }
    return [item for start in range(0, len(keys), 2)
            for item in by_keys[tuple(keys[start:start + 2])]]


def run_blocking_paths(ds: Dataset[int, Any], keys: list[int]) -> list[Any]:
    view = ds.sync
    return [
        [view.query_item(key) for key in keys],
        view.query_items(keys),
        list(view.query(keys, collate_fn=list)),
        [item for _, batch in view.batches(4, keys=keys, wrapper=list) for item in batch],
    ]


async def test_a_dict_dataset_subclass_gives_one_answer_everywhere(tmp_path: Path) -> None:
    ds = Shouting(SEED)
    keys = [3, 1, 4, 5, 9, 2, 6]
    expected = [SEED[key].upper() for key in keys]
    for answer in await every_answer(ds, keys, tmp_path):
        assert answer == expected
    assert not ds.batched_queries  # its own query_item is what batches use


class ShoutingMixin:
    """A mixin's query_item, placed before DictDataset in the bases, must win too."""

    async def query_item(self, key: int) -> str:
        return (await super().query_item(key)).upper()  # type: ignore[misc]


class MixedShouting(ShoutingMixin, DictDataset[int, str]):
    pass


async def test_a_mixin_query_item_gives_one_answer_everywhere(tmp_path: Path) -> None:
    ds = MixedShouting(SEED)
    keys = [3, 1, 4, 5]
    for answer in await every_answer(ds, keys, tmp_path):
        assert answer == [SEED[key].upper() for key in keys]
    assert not ds.batched_queries


def test_a_dict_dataset_subclass_gives_one_answer_in_the_blocking_view() -> None:
    ds = Shouting(SEED)
    keys = [0, 7, 8]
    for answer in run_blocking_paths(ds, keys):
        assert answer == [SEED[key].upper() for key in keys]


async def test_a_pickled_dataset_subclass_gives_one_answer_everywhere(tmp_path: Path) -> None:
    source = tmp_path / "source.pkl"
    await PickledDataset.create(DictDataset(SEED), source)

    class Marked(PickledDataset):
        async def query_item(self, key: Any) -> Any:
            return "marked " + await super().query_item(key)

    keys = [2, 0, 9, 5]
    with Marked(source) as ds:
        expected = [f"marked {SEED[key]}" for key in keys]
        for answer in await every_answer(ds, keys, tmp_path):
            assert answer == expected


@pytest.mark.parametrize("override", ["query_item", "query_items"])
async def test_blocking_reads_on_the_calling_thread_follow_overrides(
    tmp_path: Path, override: str
) -> None:
    # A PickledDataset or DictDataset is read by the blocking view on the script's
    # thread; a subclass that fetches its own way is read its own way there too.
    source = tmp_path / "source.pkl"
    await PickledDataset.create(DictDataset(SEED), source)

    def marked(base: type) -> type:
        if override == "query_item":
            async def query_item(self: Any, key: Any) -> Any:
                return "marked " + await base.query_item(self, key)

            return type("Marked", (base,), {"query_item": query_item})

        async def query_items(self: Any, keys: Any, concurrency: Any = None) -> Any:
            return ["marked " + item for item in await base.query_items(self, keys)]

        return type("Marked", (base,), {"query_items": query_items, "batched_queries": True})

    keys = [2, 0, 9]
    expected = [f"marked {SEED[key]}" for key in keys]
    with marked(PickledDataset)(source) as ds:
        answers = await asyncio.to_thread(run_blocking_paths, ds, keys)
    answers += await asyncio.to_thread(run_blocking_paths, marked(DictDataset)(SEED), keys)
    for answer in answers:
        assert answer == expected


class Doubling(AugmentedDataset[tuple[int, int], str]):
    def augment(self, root_key: int, root_item: str) -> Any:
        yield (root_key, 0), root_item
        yield (root_key, 1), root_item * 2


def combinator_subclasses() -> list[tuple[str, Dataset[Any, Any], list[Any], list[Any]]]:
    def marked(cls: type) -> type:
        class Marked(cls):  # type: ignore[valid-type, misc]
            async def query_item(self, key: Any) -> Any:
                return ("marked", await super().query_item(key))

        Marked.__name__ = f"Marked{cls.__name__}"
        return Marked

    parent = DictDataset(SEED)
    keys = [4, 1, 7]
    child_keys = [(4, 1), (1, 0), (7, 1)]
    return [
        ("transformed", marked(TransformedDataset)(parent, [lambda k, v: v + "!"]), keys,
         [("marked", SEED[k] + "!") for k in keys]),
        ("filtered", marked(FilteredDataset)(parent, lambda k: True), keys,
         [("marked", SEED[k]) for k in keys]),
        ("filtered pairs", marked(FilteredDataset)(parent, lambda k, v: True), keys,
         [("marked", SEED[k]) for k in keys]),
        ("cached", marked(CachedDataset)(parent), keys, [("marked", SEED[k]) for k in keys]),
        ("subset", marked(Subset)(parent, keys), keys, [("marked", SEED[k]) for k in keys]),
        ("augmented", marked(Doubling)(parent), child_keys,
         [("marked", SEED[r] * (c + 1)) for r, c in child_keys]),
    ]


@pytest.mark.parametrize(
    ("name", "ds", "keys", "expected"),
    combinator_subclasses(),
    ids=[case[0] for case in combinator_subclasses()],
)
async def test_each_combinator_subclass_is_respected(
    name: str, ds: Dataset[Any, Any], keys: list[Any], expected: list[Any], tmp_path: Path
) -> None:
    assert [await ds.query_item(key) for key in keys] == expected
    assert await ds.query_items(keys) == expected
    got = [item async for _, batch in ds.batches(2, keys=keys, collate_fn=list) for item in batch]
    assert got == expected
    outer = TransformedDataset(ds, [lambda key, item: item])
    assert await outer.query_items(keys) == expected


@pytest.mark.parametrize(
    ("name", "ds", "keys", "expected"),
    combinator_subclasses(),
    ids=[case[0] for case in combinator_subclasses()],
)
def test_each_combinator_subclass_is_respected_in_the_blocking_view(
    name: str, ds: Dataset[Any, Any], keys: list[Any], expected: list[Any]
) -> None:
    # Over a DictDataset, a Subset or a TransformedDataset is read on the calling
    # thread; subclassed to fetch their own way, they are read their own way.
    outer = Subset(TransformedDataset(ds, [lambda key, item: item]), keys)
    for view in (ds.sync, outer.sync):
        assert [view.query_item(key) for key in keys] == expected
        assert view.query_items(keys) == expected


def test_a_bulk_backend_must_say_so() -> None:
    with pytest.raises(TypeError, match="batched_queries = True"):

        class Silent(Dataset[int, int]):
            def yield_keys(self) -> list[int]:
                return [1]

            async def query_items(
                self, keys: Sequence[int], concurrency: int | None = None
            ) -> list[int]:
                return list(keys)


async def test_a_bulk_backend_gets_query_item_and_one_call_per_batch() -> None:
    calls: list[list[int]] = []

    class Bulk(Dataset[int, int]):
        batched_queries = True

        def yield_keys(self) -> range:
            return range(10)

        async def query_items(
            self, keys: Sequence[int], concurrency: int | None = None
        ) -> list[int]:
            calls.append(list(keys))
            return [key * 10 for key in keys]

    ds = Bulk()
    assert await ds.query_item(3) == 30
    assert [keys async for keys, _ in ds.batches(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert calls == [[3], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_dataset_must_fetch_somehow() -> None:
    class Nothing(Dataset[int, int]):
        def yield_keys(self) -> list[int]:
            return [1]

    with pytest.raises(TypeError, match="query_item"):
        Nothing()


def test_plain_def_query_items_is_refused() -> None:
    with pytest.raises(TypeError, match="async def query_items"):

        class Blocking(Dataset[int, int]):
            batched_queries = True

            def yield_keys(self) -> list[int]:
                return [1]

            def query_items(self, keys: Any, concurrency: Any = None) -> Any:  # type: ignore[override]
                return list(keys)


class Gauge(Dataset[int, int]):
    """Counts fetches in flight; every fetch waits for a real loop turn."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.active = 0
        self.most = 0

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> int:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            return key
        finally:
            self.active -= 1


async def test_query_items_and_query_are_bounded() -> None:
    ds = Gauge(5000)
    assert await ds.query_items(range(5000)) == list(range(5000))
    assert ds.most == 64  # the default bound, reached and never passed
    ds.most = 0
    assert (await ds.query(range(300), concurrency=7)).tolist() == list(range(300))
    assert ds.most == 7
    with pytest.raises(ValueError, match="concurrency"):
        await ds.query_items([1], concurrency=0)


async def test_create_is_bounded_by_its_concurrency(tmp_path: Path) -> None:
    ds = Gauge(2000)
    assert await PickledDataset.create(ds, tmp_path / "g.pkl", concurrency=16) == 2000
    assert ds.most == 16
    with PickledDataset(tmp_path / "g.pkl") as stored:
        assert await stored.query_items([0, 1999]) == [0, 1999]
