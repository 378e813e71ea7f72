"""Completion order, the failure policy, stats and the progress bar of a stream."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from mlworkflow_async import AugmentedDataset, Dataset, DictDataset, FilteredDataset
from mlworkflow_async.exceptions import TooManyFailuresError


class Broken(Dataset[int, int]):
    """Keys in ``bad`` raise ``ValueError``; ``gate`` holds back the keys in ``slow``."""

    def __init__(self, n: int, bad: Iterable[int] = (), slow: Iterable[int] = ()) -> None:
        self.n = n
        self.bad = set(bad)
        self.slow = set(slow)
        self.gate = anyio.Event()

    def yield_keys(self) -> list[int]:
        return list(range(self.n))

    async def query_item(self, key: int) -> int:
        if key in self.slow:
            await self.gate.wait()
        if key in self.bad:
            raise ValueError(f"bad item {key}")
        return key * 10


class BulkBroken(DictDataset[int, int]):
    """A bulk backend (one query_items per batch) whose bad keys fail their batch."""

    def __init__(self, n: int, bad: set[int]) -> None:
        super().__init__({i: i * 10 for i in range(n)})
        self.bad = bad

    async def query_items(self, keys: Any, concurrency: int | None = None) -> list[int]:
        if self.bad & set(keys):
            raise ValueError(f"bad item among {list(keys)}")
        return await super().query_items(keys)


async def test_one_slow_item_delays_only_its_own_batch_in_completion_order() -> None:
    ds = Broken(40, slow={1})
    stream = ds.batches(4, ordered=False, concurrency=8)
    seen: list[list[int]] = []
    with anyio.fail_after(60):  # held back by the slow item, the stream would hang
        async for keys, _ in stream:
            seen.append(keys)
            if len(seen) == 9:  # every other batch came while key 1 was held back
                assert [0, 1, 2, 3] not in seen
                ds.gate.set()
    assert seen[-1] == [0, 1, 2, 3]
    assert sorted(k for keys in seen for k in keys) == list(range(40))
    assert stream.stats.items == 40


async def test_an_ordered_stream_waits_for_the_slow_item() -> None:
    ds = Broken(40, slow={1})
    stream = ds.batches(4, concurrency=8)
    async with anyio.create_task_group() as tg:
        first: list[list[int]] = []

        async def consume() -> None:
            first.append((await anext(stream))[0])

        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        assert first == []  # the head of the order is held back: nothing comes out
        ds.gate.set()
    assert first == [[0, 1, 2, 3]]
    assert stream.stats.head_wait > 0
    await stream.aclose()


async def test_the_default_is_to_raise_with_the_key_named() -> None:
    stream = Broken(20, bad={6}).batches(4)
    got = []
    with pytest.raises(ValueError, match="bad item 6") as info:
        async for keys, _ in stream:
            got.append(keys)
    assert got == [[0, 1, 2, 3]]  # every batch before the failing one came out
    assert any("while querying key 6 of Broken" in note for note in info.value.__notes__)


@pytest.mark.parametrize("ordered", [True, False])
async def test_skip_leaves_failed_items_out_and_records_them(ordered: bool) -> None:
    stream = Broken(20, bad={2, 9, 13}).batches(4, on_error="skip", ordered=ordered)
    batches = {tuple(keys): batch.tolist() async for keys, batch in stream}
    assert sorted(batches) == [(0, 1, 3), (4, 5, 6, 7), (8, 10, 11), (12, 14, 15), (16, 17, 18, 19)]
    assert batches[(0, 1, 3)] == [0, 10, 30]  # shorter, with the items that worked
    assert sorted(f.key for f in stream.failures) == [2, 9, 13]
    assert all(isinstance(f.exception, ValueError) for f in stream.failures)
    assert "bad item 9" in str(next(f for f in stream.failures if f.key == 9).exception)
    stats = stream.stats
    assert (stats.fetched, stats.failed, stats.items, stats.batches) == (17, 3, 17, 5)
    assert stats.in_flight == 0


async def test_skip_salvages_a_failed_bulk_batch_item_by_item() -> None:
    stream = BulkBroken(12, bad={5}).batches(4, on_error="skip")
    got = [(keys, batch.tolist()) async for keys, batch in stream]
    assert got == [
        ([0, 1, 2, 3], [0, 10, 20, 30]),
        ([4, 6, 7], [40, 60, 70]),
        ([8, 9, 10, 11], [80, 90, 100, 110]),
    ]
    assert [f.key for f in stream.failures] == [5]


async def test_max_failures_as_a_count_raises_one_summary() -> None:
    stream = Broken(40, bad={3, 7, 11, 30}).batches(4, on_error="skip", max_failures=2)
    with pytest.raises(TooManyFailuresError) as info:
        async for _ in stream:
            pass
    error = info.value
    assert isinstance(error, RuntimeError)
    assert str(error).startswith("3 of ")
    assert "items failed (3 ValueError), more than max_failures=2" in str(error)
    assert "the first was key 3: ValueError: bad item 3" in str(error)
    assert [f.key for f in error.failures] == [3, 7, 11]


async def test_max_failures_within_the_limit_lets_the_epoch_finish() -> None:
    stream = Broken(40, bad={3, 7}).batches(4, on_error="skip", max_failures=2)
    assert sum([len(keys) async for keys, _ in stream]) == 38


async def test_max_failures_as_a_fraction_of_the_items_seen() -> None:
    # 10% allowed: 2 of 100 fail, fine; 20 of 100 fail, too many.
    ok = Broken(100, bad={10, 50}).batches(10, on_error="skip", max_failures=0.1)
    assert sum([len(keys) async for keys, _ in ok]) == 98
    many = Broken(100, bad=set(range(0, 100, 5))).batches(10, on_error="skip", max_failures=0.1)
    with pytest.raises(TooManyFailuresError, match=r"more than max_failures=10\.0% of items"):
        async for _ in many:
            pass


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"on_error": "ignore"}, ValueError, 'on_error must be "raise" or "skip"'),
        ({"max_failures": -1}, ValueError, "max_failures must be at least 0"),
        ({"max_failures": 1.5}, ValueError, "between 0 and 1"),
        ({"max_failures": "5"}, TypeError, "max_failures must be None, a count or a fraction"),
    ],
)
def test_wrong_failure_options_are_refused(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Broken(3).batches(2, **options)


def test_the_blocking_view_has_failures_and_stats() -> None:
    stream = Broken(10, bad={4}).sync.batches(3, on_error="skip")
    assert [keys for keys, _ in stream] == [[0, 1, 2], [3, 5], [6, 7, 8], [9]]
    assert [f.key for f in stream.failures] == [4]
    assert stream.stats.failed == 1
    assert stream.stats.items == 9
    assert stream.stats.items_per_second > 0
    assert "failed=1" in repr(stream.stats)


async def test_progress_shows_items_batches_and_rate(capsys: pytest.CaptureFixture[str]) -> None:
    stream = Broken(50).batches(8, progress=True, shuffle=1)
    assert sum([len(keys) async for keys, _ in stream]) == 50
    err = capsys.readouterr().err
    assert "50/50" in err
    assert "7 batches" in err
    assert "item/s" in err


async def test_progress_without_tqdm_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    stream = Broken(5).batches(2, progress=True)
    with pytest.warns(UserWarning, match=r"pip install 'mlworkflow-async\[tqdm\]'"):
        assert [keys async for keys, _ in stream] == [[0, 1], [2, 3], [4]]


def odd_but_not_5(key: int) -> bool:
    if key == 5:
        raise ValueError("cannot judge key 5")
    return key % 2 == 1


async def odd_but_not_5_async(key: int) -> bool:
    await anyio.lowlevel.checkpoint()
    return odd_but_not_5(key)


class Halves(AugmentedDataset[tuple[int, int], int]):
    """Two children per root; root 3 cannot be augmented."""

    def augment(self, root_key: int, root_item: int) -> Any:
        if root_key == 3:
            raise ValueError("cannot augment root 3")
        yield (root_key, 0), root_item
        yield (root_key, 1), root_item + 1


def discovering(kind: str) -> Dataset[Any, Any]:
    parent = DictDataset({i: i * 10 for i in range(20)})
    if kind == "augment":
        return Halves(parent)
    if kind == "pairs":
        return FilteredDataset(parent, lambda key, item: odd_but_not_5(key))
    return FilteredDataset(parent, odd_but_not_5_async if kind == "async" else odd_but_not_5)


def expected(kind: str) -> tuple[list[Any], int]:
    """The keys a skipping stream hands out, and the key it records as failed."""
    if kind == "augment":
        return [(r, c) for r in range(20) if r != 3 for c in (0, 1)], 3
    return [k for k in range(20) if k % 2 == 1 and k != 5], 5


KINDS = ["keys", "async", "pairs", "augment"]


@pytest.mark.parametrize("options", [{}, {"shuffle": 2}, {"ordered": False}], ids=repr)
@pytest.mark.parametrize("kind", KINDS)
async def test_skip_leaves_out_a_key_whose_discovery_fails(
    kind: str, options: dict[str, Any]
) -> None:
    ds = discovering(kind)
    stream = ds.batches(3, on_error="skip", **options)
    with anyio.fail_after(10):
        got = [key async for keys, _ in stream for key in keys]
    keys, bad = expected(kind)
    assert sorted(got) == keys
    assert [f.key for f in stream.failures] == [bad]
    assert isinstance(stream.failures[0].exception, ValueError)
    assert f"cannot {'augment root' if kind == 'augment' else 'judge key'} {bad}" in str(
        stream.failures[0].exception
    )
    assert stream.stats.failed == 1
    assert stream.stats.items == len(keys)
    assert await ds.keys.all() == keys  # left out of the memoized keys for good


@pytest.mark.parametrize("kind", KINDS)
async def test_raise_stops_at_a_key_whose_discovery_fails_and_names_it(kind: str) -> None:
    stream = discovering(kind).batches(3)
    with pytest.raises(ValueError, match="cannot") as info:
        async for _ in stream:
            pass
    _, bad = expected(kind)
    assert any(f"key {bad}" in note for note in info.value.__notes__)


async def test_discovery_failures_count_towards_max_failures() -> None:
    parent = DictDataset({i: i for i in range(40)})
    ds = FilteredDataset(parent, lambda key: bool(1 // (key % 10)))  # 0, 10, 20, 30 fail
    stream = ds.batches(4, on_error="skip", max_failures=2)
    with pytest.raises(TooManyFailuresError, match="3 of "):
        async for _ in stream:
            pass


def test_the_blocking_view_skips_a_key_whose_discovery_fails() -> None:
    stream = discovering("augment").sync.batches(4, on_error="skip")
    assert sorted(key for keys, _ in stream for key in keys) == expected("augment")[0]
    assert [f.key for f in stream.failures] == [3]


def test_skipping_a_key_whose_discovery_fails_under_trio() -> None:
    pytest.importorskip("trio")

    async def main() -> tuple[list[Any], list[Any]]:
        stream = discovering("keys").batches(3, on_error="skip")
        got = [key async for keys, _ in stream for key in keys]
        return got, [f.key for f in stream.failures]

    assert anyio.run(main, backend="trio") == (expected("keys")[0], [5])


class Counted(Broken):
    """:class:`Broken`, recording every key read."""

    def __init__(self, n: int, bad: Iterable[int] = ()) -> None:
        super().__init__(n, bad)
        self.read: list[int] = []

    async def query_item(self, key: int) -> int:
        self.read.append(key)
        return await super().query_item(key)


def no_empty_batch(items: list[int]) -> list[int]:
    assert items, "collate_fn called with no item"
    return items


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("bulk", [False, True])
async def test_skip_drops_a_batch_whose_items_all_failed(ordered: bool, bulk: bool) -> None:
    bad = {4, 5, 6, 7, 16, 17}
    ds = BulkBroken(20, bad) if bulk else Broken(20, bad)
    stream = ds.batches(4, on_error="skip", ordered=ordered, collate_fn=no_empty_batch)
    got = {tuple(keys): batch async for keys, batch in stream}
    assert sorted(got) == [(0, 1, 2, 3), (8, 9, 10, 11), (12, 13, 14, 15), (18, 19)]
    assert got[(18, 19)] == [180, 190]
    assert sorted(f.key for f in stream.failures) == sorted(bad)
    assert (stream.stats.batches, stream.stats.items, stream.stats.failed) == (4, 14, 6)


async def test_skip_drops_a_last_batch_whose_items_all_failed() -> None:
    stream = Broken(10, bad={8, 9}).batches(4, on_error="skip")
    assert [keys async for keys, _ in stream] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_dropped_batch_resumes_exactly(ordered: bool) -> None:
    bad = {4, 5, 6, 7}
    options: dict[str, Any] = {"on_error": "skip", "ordered": ordered}
    full = [keys async for keys, _ in Counted(20, bad).batches(4, **options)]
    assert sorted(full) == [[0, 1, 2, 3], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    for count in range(len(full) + 1):
        first = Counted(20, bad)
        stream = first.batches(4, concurrency=4, **options)
        got = [(await anext(stream))[0] for _ in range(count)]
        state = stream.state_dict()
        await stream.aclose()
        again = Counted(20, bad)
        rest = [keys async for keys, _ in again.batches(4, resume=state, **options)]
        assert sorted(got + rest) == sorted(full)  # nothing lost, nothing twice
        if ordered and count >= 2:
            assert not bad & set(again.read)  # resumed past the dropped batch
