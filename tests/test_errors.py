"""Clear errors for bad input: each names the parameter, key or dataset and what is expected."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import (
    AugmentedDataset,
    CachedDataset,
    Dataset,
    DictDataset,
    FilteredDataset,
    Subset,
    UnhashableKeyError,
)

SEED = {i: i * 10 for i in range(6)}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": "4"}, TypeError, r"batch_size must be an integer.*'4'"),
        ({"batch_size": None}, TypeError, r"batch_size must be an integer.*None"),
        ({"batch_size": 2.5}, TypeError, r"batch_size must be an integer.*2\.5"),
        ({"batch_size": True}, TypeError, r"batch_size must be an integer"),
        ({"batch_size": 0}, ValueError, r"batch_size must be at least 1, got 0"),
        ({"batch_size": 2, "concurrency": "8"}, TypeError, r"concurrency must be an integer"),
        ({"batch_size": 2, "concurrency": 0}, ValueError, r"concurrency must be at least 1"),
        ({"batch_size": 2, "shuffle": True}, TypeError, r"shuffle takes an integer seed"),
        ({"batch_size": 2, "shuffle": 1.5}, TypeError, r"shuffle takes an integer seed"),
        ({"batch_size": 2, "epoch": -1}, TypeError, r"epoch must be an integer of at least 0"),
        ({"batch_size": 2, "shard": (2, 2)}, ValueError, r"0 <= rank < world_size.*\(2, 2\)"),
        ({"batch_size": 2, "shard": (-1, 2)}, ValueError, r"0 <= rank < world_size"),
        ({"batch_size": 2, "shard": (0.5, 2)}, TypeError, r"shard must be a pair of integers"),
        ({"batch_size": 2, "shard": 3}, TypeError, r"shard must be a pair of integers"),
        ({"batch_size": 2, "on_error": "ignore"}, ValueError, r'on_error must be "raise"'),
        ({"batch_size": 2, "max_failures": -1}, ValueError, r"max_failures must be at least 0"),
        ({"batch_size": 2, "max_failures": 1.5}, ValueError, r"between 0 and 1"),
        ({"batch_size": 2, "max_failures": "3"}, TypeError, r"max_failures must be None"),
        ({"batch_size": 2, "collate_fn": 3}, TypeError, r"collate_fn must be a function"),
        ({"batch_size": 2, "wrapper": "list"}, TypeError, r"wrapper must be a callable"),
    ],
)
def test_batches_arguments_are_checked_at_once(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        DictDataset(SEED).batches(**kwargs)


def test_a_type_as_keys_suggests_wrapper() -> None:
    with pytest.raises(TypeError, match=r"second positional parameter of batches\(\) is keys.*"
                       r"did you mean wrapper=ndarray\?"):
        DictDataset(SEED).batches(4, np.ndarray)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"did you mean wrapper=list\?"):
        DictDataset(SEED).batches(4, list)  # type: ignore[arg-type]


def test_cached_maxsize_is_checked() -> None:
    with pytest.raises(TypeError, match=r"maxsize must be None \(no bound\) or an integer.*'x'"):
        CachedDataset(DictDataset(SEED), maxsize="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxsize"):
        CachedDataset(DictDataset(SEED), maxsize=0)


def test_dict_dataset_needs_a_mapping() -> None:
    with pytest.raises(TypeError, match=r"DictDataset takes a mapping of keys to items, got list"):
        DictDataset([1, 2])  # type: ignore[arg-type]


async def test_a_subset_key_missing_from_the_parent_is_named() -> None:
    sub = Subset(DictDataset(SEED), [1, 999])
    with pytest.raises(KeyError, match=r"999 is one of the keys given to this Subset, but not a "
                       r"key of its parent DictDataset"):
        await sub.keys.all()
    with pytest.raises(KeyError, match="999"):
        len(sub)


async def test_yield_keys_errors_name_the_dataset() -> None:
    class Listing(Dataset[int, int]):
        def yield_keys(self) -> Any:
            yield 1
            raise OSError("the listing failed")

        async def query_item(self, key: int) -> int:
            return key

    with pytest.raises(OSError, match="the listing failed") as info:
        await Listing().keys.all()
    assert any("while discovering the keys of Listing" in note for note in info.value.__notes__)

    class Broken(Dataset[int, int]):
        def yield_keys(self) -> Any:
            raise LookupError("no index")

        async def query_item(self, key: int) -> int:
            return key

    with pytest.raises(LookupError) as failed:
        [keys async for keys, _ in Broken().batches(2)]
    assert any("keys of Broken" in note for note in failed.value.__notes__)


async def test_augment_making_a_child_key_twice_is_an_error() -> None:
    class Twice(AugmentedDataset[tuple[int, int], int]):
        def augment(self, root_key: int, root_item: int) -> Any:
            for _ in range(2):
                yield (root_key, 0), root_item

    with pytest.raises(ValueError, match=r"made child key \(3, 0\) twice from root key 3"):
        await Twice(DictDataset({3: 30})).keys.all()
    with pytest.raises(ValueError, match="twice"):
        await Twice(DictDataset({3: 30})).query_item((3, 0))


async def test_a_repeated_child_key_past_the_first_root_is_an_error() -> None:
    class Late(AugmentedDataset[tuple[int, int], int]):
        def augment(self, root_key: int, root_item: int) -> Any:
            yield (root_key, 0), root_item
            if root_key == 3:
                yield (root_key, 0), root_item  # the same root, twice
            if root_key == 2:
                yield (1, 0), root_item  # root 1's child, made again by root 2

    with pytest.raises(ValueError, match=r"made child key \(3, 0\) twice from root key 3"):
        await Late(DictDataset({1: 10, 3: 30})).keys.all()
    with pytest.raises(ValueError, match=r"child key \(1, 0\) from root keys 1 and 2"):
        await Late(DictDataset({1: 10, 2: 20})).keys.all()


async def test_an_augment_failing_past_the_first_roots_names_its_root() -> None:
    class Failing(AugmentedDataset[tuple[int, int], int]):
        def augment(self, root_key: int, root_item: int) -> Any:
            if root_key == 15:
                raise ValueError("bad root")
            yield (root_key, 0), root_item

    class NotPairs(AugmentedDataset[tuple[int, int], int]):
        def augment(self, root_key: int, root_item: int) -> Any:
            if root_key == 12:
                return 3
            return iter([((root_key, 0), root_item)])

    roots = DictDataset({i: i for i in range(40)})
    with pytest.raises(ValueError, match="bad root") as failed:
        await Failing(roots).keys.all()
    assert any("root key 15 in Failing.augment()" in note for note in failed.value.__notes__)
    with pytest.raises(TypeError, match=r"augment\(\) returned int") as wrong:
        await NotPairs(roots).keys.all()
    assert any("root key 12" in note for note in wrong.value.__notes__)


async def test_keys_all_returns_a_new_list_to_shuffle() -> None:
    ds = DictDataset(SEED)
    keys = await ds.keys.all()
    assert isinstance(keys, list)
    random.Random(0).shuffle(keys)
    keys.append(99)
    assert await ds.keys.all() == list(SEED)  # the dataset's own keys are untouched


def test_blocking_keys_all_returns_a_new_list_too() -> None:
    ds = DictDataset(SEED)
    keys = ds.sync.keys.all()
    random.Random(0).shuffle(keys)
    assert ds.sync.keys.all() == list(SEED)


class Copies(AugmentedDataset[Any, Any]):
    def augment(self, root_key: Any, root_item: Any) -> Any:
        yield (root_key, 0), root_item


UNHASHABLE_KEYS = {
    "CachedDataset": lambda: CachedDataset(DictDataset(SEED)),
    "FilteredDataset": lambda: FilteredDataset(DictDataset(SEED), lambda key: True),
    "FilteredDataset ": lambda: FilteredDataset(DictDataset(SEED), lambda key, item: True),
    "Subset": lambda: Subset(DictDataset(SEED), [1, 2]),
    "Copies": lambda: Copies(DictDataset(SEED)),
    "DictDataset": lambda: DictDataset(SEED),
}


def check_unhashable(error: pytest.ExceptionInfo[UnhashableKeyError], name: str) -> None:
    assert isinstance(error.value, TypeError)
    message = str(error.value)
    assert f"key [1, 0] given to {name.strip()} cannot be hashed" in message
    assert "unhashable type: 'list'" in message
    assert "keys must be hashable, e.g. a tuple instead of a list" in message


@pytest.mark.parametrize("name", list(UNHASHABLE_KEYS))
async def test_an_unhashable_key_is_named_with_its_dataset(name: str) -> None:
    ds = UNHASHABLE_KEYS[name]()
    await ds.keys.all()  # discovery done: the lookups that fail are the queries'
    with pytest.raises(UnhashableKeyError) as info:
        await ds.query_item([1, 0])
    check_unhashable(info, name)
    with pytest.raises(UnhashableKeyError) as info:
        await ds.query_items([[1, 0], [2, 0]])
    check_unhashable(info, name)
    with pytest.raises(UnhashableKeyError) as info:
        await ds.query([[1, 0]], concurrency=2)
    check_unhashable(info, name)


@pytest.mark.parametrize("name", list(UNHASHABLE_KEYS))
def test_an_unhashable_key_is_named_by_the_blocking_view(name: str) -> None:
    ds = UNHASHABLE_KEYS[name]()
    with pytest.raises(UnhashableKeyError) as info:
        ds.sync.query_item([1, 0])
    check_unhashable(info, name)
    with pytest.raises(UnhashableKeyError) as info:
        ds.sync.query_items([[1, 0]])
    check_unhashable(info, name)


def test_an_unhashable_key_given_to_a_subset_is_named() -> None:
    with pytest.raises(UnhashableKeyError) as info:
        Subset(DictDataset(SEED), [1, [1, 0]])
    check_unhashable(info, "Subset")


async def test_other_type_errors_with_hashable_keys_stay_as_they_are() -> None:
    def judge(key: int) -> bool:
        raise TypeError("the predicate's own mistake")

    ds = CachedDataset(FilteredDataset(DictDataset(SEED), judge))
    with pytest.raises(TypeError, match="the predicate's own mistake") as info:
        await ds.query_items([1, 2])
    assert type(info.value) is TypeError
