"""FilteredDataset: key and pair predicates, sync and async, errors, fetch counts."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np
import pytest

from mlworkflow_async import DictDataset, FilteredDataset, KeysNotReadyError, TransformedDataset
from tests._datasets import Counting
from tests.conftest import wait_until

SEED = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f"}


async def items_of(dataset: FilteredDataset[int, str]) -> list[str]:
    return [await dataset.query_item(key) async for key in dataset.keys]


async def test_seed_examples_by_key_and_by_pair() -> None:
    parent = DictDataset(SEED)
    by_key = FilteredDataset(parent, lambda k: k % 2 == 0)
    by_pair = FilteredDataset(parent, predicate=lambda k, v: k % 2 == 0)
    assert not by_key.by_pairs
    assert by_pair.by_pairs
    assert await items_of(by_key) == ["b", "d", "f"]
    assert await items_of(by_pair) == ["b", "d", "f"]


async def test_async_predicates() -> None:
    async def even_key(key: int) -> bool:
        await asyncio.sleep(0)
        return key % 2 == 0

    async def vowel(key: int, item: str) -> bool:
        await asyncio.sleep(0)
        return item in "aeiou"

    parent = DictDataset(SEED)
    assert await items_of(FilteredDataset(parent, even_key)) == ["b", "d", "f"]
    assert await items_of(FilteredDataset(parent, vowel)) == ["a", "e"]
    assert await FilteredDataset(parent, vowel).query_items([5, 1]) == ["e", "a"]


async def test_keep_positive_false_keeps_the_rejected() -> None:
    parent = DictDataset(SEED)
    odd = FilteredDataset(parent, lambda k: k % 2 == 0, keep_positive=False)
    assert await odd.keys.all() == [1, 3, 5]
    odd_pairs = FilteredDataset(parent, lambda k, v: k % 2 == 0, keep_positive=False)
    assert await items_of(odd_pairs) == ["a", "c", "e"]


async def test_numpy_bools_are_bools() -> None:
    ds = FilteredDataset(DictDataset(SEED), lambda k: np.bool_(k > 4))
    assert await ds.keys.all() == [5, 6]
    assert await ds.query_item(6) == "f"


async def test_key_predicate_never_fetches_items_to_filter() -> None:
    parent = Counting(SEED)
    ds = FilteredDataset(parent, lambda k: k % 2 == 0)
    assert await ds.keys.all() == [2, 4, 6]
    assert parent.total == 0
    assert await ds.query_items([2, 4]) == ["b", "d"]
    assert await ds.query_item(6) == "f"
    assert parent.fetches == {2: 1, 4: 1, 6: 1}


async def test_pair_predicate_fetches_each_item_once_for_a_stream() -> None:
    parent = Counting({i: str(i) for i in range(40)})
    ds = FilteredDataset(parent, lambda k, v: v.endswith("3"))
    got = [(keys, batch) async for keys, batch in ds.batches(2, wrapper=list)]
    assert got == [([3, 13], ["3", "13"]), ([23, 33], ["23", "33"])]
    assert parent.total == 40  # judging needs every item once; the kept ones were held
    # Held only until queried once: nothing is kept forever.
    assert await ds.query_item(13) == "13"
    assert parent.fetches[13] == 2


async def test_pair_predicate_keys_alone_hold_no_item() -> None:
    made: list[weakref.ref[np.ndarray]] = []

    def fresh(key: int, item: int) -> np.ndarray:
        array = np.full(1000, item)
        made.append(weakref.ref(array))
        return array

    ds = FilteredDataset(
        TransformedDataset(DictDataset({i: i for i in range(300)}), [fresh]),
        lambda k, v: True,
    )
    keys = await ds.keys.all()  # no reader claims keys: nothing to hold for
    assert len(keys) == 300
    gc.collect()
    assert len(made) == 300
    assert [ref for ref in made if ref() is not None] == []


async def test_pair_predicate_interleaved_and_query_items() -> None:
    parent = Counting({i: i * i for i in range(30)})
    ds = FilteredDataset(parent, lambda k, v: v % 2 == 0)
    seen = []
    async for key in ds.keys:
        seen.append(await ds.query_item(key))
    assert seen == [i * i for i in range(0, 30, 2)]
    assert set(parent.fetches.values()) == {1}
    ds2 = FilteredDataset(parent := Counting({i: i for i in range(10)}), lambda k, v: v > 4)
    keys = await ds2.keys.all()
    assert await ds2.query_items(keys) == [5, 6, 7, 8, 9]
    assert parent.fetches == {**dict.fromkeys(range(5), 1), **dict.fromkeys(range(5, 10), 2)}


async def test_pair_buffer_is_bounded_by_the_reader() -> None:
    parent = Counting({i: i for i in range(100)})
    ds = FilteredDataset(parent, lambda k, v: True, buffer_size=6)
    reader = aiter(ds.keys)  # a live reader, claiming one key at a time
    keys = await ds.keys.all()
    assert len(keys) == 100
    assert parent.total == 100
    # Only what the reader may still claim (twice its one key) plus the last
    # step of discovery (buffer_size // 2 items) is held; the rest is fetched again.
    assert await ds.query_items(list(keys)) == list(range(100))
    refetched = [key for key, count in parent.fetches.items() if count == 2]
    assert 100 - (2 * 1 + 6 // 2) <= len(refetched) < 100
    assert parent.fetches[99] == 1
    del reader


async def test_query_item_on_rejected_or_missing_key_names_it() -> None:
    for predicate in (lambda k: k % 2 == 0, lambda k, v: k % 2 == 0):
        ds = FilteredDataset(DictDataset(SEED), predicate)
        with pytest.raises(KeyError, match="3 is not a key of this FilteredDataset"):
            await ds.query_item(3)
        with pytest.raises(KeyError) as info:
            await ds.query_item(42)
        assert "42" in str(info.value) + "".join(getattr(info.value, "__notes__", []))
        with pytest.raises(KeyError, match="5 is not a key"):
            await ds.query_items([2, 5])


@pytest.mark.parametrize("predicate", [lambda: True, lambda k, v, w: True, lambda *a: True])
def test_wrong_arity_is_a_type_error_at_construction(predicate: object) -> None:
    with pytest.raises(TypeError, match=r"takes the key \(one argument\) or the key and the item"):
        FilteredDataset(DictDataset(SEED), predicate)  # type: ignore[arg-type]


async def test_non_bool_result_is_a_type_error_naming_key_and_type() -> None:
    by_key = FilteredDataset(DictDataset(SEED), lambda k: k % 2)
    with pytest.raises(TypeError, match=r"type int for key 1\b.*must return a bool"):
        await by_key.keys.all()
    with pytest.raises(TypeError, match="for key 4"):
        await by_key.query_item(4)
    by_pair = FilteredDataset(DictDataset(SEED), lambda k, v: v)
    with pytest.raises(TypeError, match="returned a value of type str for key 1"):
        await by_pair.keys.all()
    with pytest.raises(TypeError, match="returned a value of type str for key 2"):
        await by_pair.query_item(2)


async def test_sync_predicate_returning_a_coroutine_says_to_declare_it_async() -> None:
    async def check(key: int) -> bool:
        return True

    ds = FilteredDataset(DictDataset(SEED), lambda k: check(k))
    with pytest.raises(TypeError, match=r"returned a coroutine for key 1.*async def"):
        await ds.query_item(1)


async def test_predicate_exception_propagates_with_the_key() -> None:
    def fragile(key: int) -> bool:
        if key == 4:
            raise ValueError("bad key")
        return True

    ds = FilteredDataset(DictDataset(SEED), fragile)
    with pytest.raises(ValueError, match="bad key") as info:
        await ds.keys.all()
    assert any("key 4" in note for note in info.value.__notes__)
    assert any("fragile" in note for note in info.value.__notes__)
    # The failure does not pass for the end of the keys: asking again retries.
    assert not ds.keys.complete
    with pytest.raises(ValueError, match="bad key"):
        await ds.keys.all()


async def test_len_only_once_own_keys_are_complete() -> None:
    ds = FilteredDataset(DictDataset(SEED), lambda k: k > 2)
    with pytest.raises(KeysNotReadyError):
        len(ds)
    assert [key async for key in ds.keys][:1] == [3]
    await ds.keys.all()
    assert len(ds) == 4
    pairs = FilteredDataset(DictDataset(SEED), lambda k, v: v < "c")
    with pytest.raises(KeysNotReadyError):
        len(pairs)
    await pairs.keys.all()
    assert len(pairs) == 2


async def test_batches_delegate_to_parent_and_context() -> None:
    parent = Counting(SEED, bulk=True, context={"source": "test"})
    ds = FilteredDataset(parent, lambda k: k != 3)
    assert ds.batched_queries
    assert ds.context == {"source": "test"}
    assert FilteredDataset(DictDataset(SEED), lambda k: True).context is None
    batches = [(keys, batch.tolist()) async for keys, batch in ds.batches(2)]
    assert batches == [([1, 2], ["a", "b"]), ([4, 5], ["d", "e"]), ([6], ["f"])]
    assert parent.bulk_calls == [[1, 2], [4, 5], [6]]


def test_blocking_view_and_successive_event_loops() -> None:
    ds = FilteredDataset(DictDataset(SEED), lambda k, v: v > "b")
    assert asyncio.run(ds.query_item(3)) == "c"
    assert ds.sync.keys.all() == [3, 4, 5, 6]
    assert asyncio.run(ds.query_items([4, 6])) == ["d", "f"]
    assert [batch.tolist() for _, batch in ds.sync.batches(3)] == [["c", "d", "e"], ["f"]]


async def test_interrupted_key_discovery_resumes_where_it_stopped() -> None:
    parent = Counting({i: i for i in range(100)})
    failures = [50]

    def flaky(key: int, item: int) -> bool:
        if failures and key == failures[0]:
            failures.pop()
            raise OSError("flaky storage")
        return True

    ds = FilteredDataset(parent, flaky)
    with pytest.raises(OSError, match="flaky storage"):
        await ds.keys.all()
    assert await ds.keys.all() == list(range(100))
    assert parent.fetches[0] == 1  # chunks judged before the failure are not redone
    assert parent.total < 200


async def test_cancelled_key_discovery_loses_nothing() -> None:
    gate = asyncio.Event()
    parent = Counting({i: str(i) for i in range(40)}, gate=gate)
    ds = FilteredDataset(parent, lambda k, v: k % 4 == 0)
    task = asyncio.create_task(ds.keys.all())
    await wait_until(lambda: parent.waiting > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    assert await ds.keys.all() == list(range(0, 40, 4))
    assert await ds.query_items([0, 36]) == ["0", "36"]


async def test_pair_items_are_held_for_readers_claiming_more_than_buffer_size() -> None:
    parent = Counting({i: i for i in range(200)}, bulk=True)  # batches claim 32 keys at once
    ds = FilteredDataset(parent, lambda k, v: v % 3 != 0, buffer_size=8)
    items = [item async for _, batch in ds.batches(32, wrapper=list) for item in batch]
    assert items == [i for i in range(200) if i % 3]
    assert set(parent.fetches.values()) == {1}


def test_blocking_iteration_fetches_each_pair_item_once() -> None:
    # The blocking view reads a chunk of keys per round trip, beyond buffer_size.
    parent = Counting({i: i for i in range(600)})
    ds = FilteredDataset(parent, lambda k, v: v % 2 == 0, buffer_size=16)
    assert [ds.sync.query_item(key) for key in ds.sync.keys] == list(range(0, 600, 2))
    assert set(parent.fetches.values()) == {1}


async def test_keys_accepted_by_discovery_are_not_judged_again() -> None:
    judged: list[int] = []

    def even(key: int) -> bool:
        judged.append(key)
        return key % 2 == 0

    ds = FilteredDataset(DictDataset({i: str(i) for i in range(100)}), even)
    assert [await ds.query_item(key) async for key in ds.keys] == [str(i) for i in range(0, 100, 2)]
    assert sorted(judged) == list(range(100))
    assert await ds.query_items([98, 96]) == ["98", "96"]
    assert len(judged) == 100
    # Keys never discovered are judged as before, and rejected ones named.
    other = FilteredDataset(DictDataset({i: str(i) for i in range(100)}), even)
    with pytest.raises(KeyError, match="3 is not a key"):
        await other.query_items([2, 3])
