"""The dataset core, the combinators and PickledDataset run under trio as under asyncio."""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

from mlworkflow_async import (
    AugmentedDataset,
    CachedDataset,
    Dataset,
    FilteredDataset,
    PickledDataset,
    TransformedDataset,
    from_sync,
)

pytest.importorskip("trio")


class Slow(Dataset[int, int]):
    """Items that each take a real suspension, as I/O would."""

    def yield_keys(self) -> range:
        return range(100)

    async def query_item(self, key: int) -> int:
        await anyio.lowlevel.checkpoint()
        return key * 2


class Twice(AugmentedDataset[tuple[int, int], int]):
    def augment(self, root_key: int, root_item: int) -> Any:
        yield (root_key, 0), root_item
        yield (root_key, 1), -root_item


class Blocking:
    """A blocking dataset, as the original library's are."""

    def yield_keys(self) -> list[int]:
        return [1]

    def query_item(self, key: int) -> int:
        return key + 1


def run_trio(main: Any) -> Any:
    return anyio.run(main, backend="trio")


def test_batches_shuffled_and_resumed_under_trio() -> None:
    async def main() -> tuple[list[int], list[int]]:
        ds = Slow()
        stream = ds.batches(8, shuffle=3, concurrency=16)
        first = [k for keys, _ in [await anext(stream)] for k in keys]
        state = stream.state_dict()
        await stream.aclose()
        rest = [k async for keys, _ in ds.batches(8, shuffle=3, resume=state) for k in keys]
        whole = [k async for keys, _ in ds.batches(8, shuffle=3) for k in keys]
        return first + rest, whole

    resumed, whole = run_trio(main)
    assert resumed == whole
    assert sorted(whole) == list(range(100))


def test_an_early_break_cancels_the_workers_under_trio() -> None:
    async def main() -> int:
        ds = Slow()
        async with ds.batches(4, concurrency=8) as stream:
            async for keys, _ in stream:
                if keys[0] >= 8:
                    break
        return len(await ds.query_items(list(range(10))))

    assert run_trio(main) == 10


def test_combinators_and_a_pickled_file_under_trio(tmp_path: Path) -> None:
    path = tmp_path / "t.pkl"

    async def main() -> tuple[Any, ...]:
        chain = Twice(TransformedDataset(FilteredDataset(Slow(), lambda k: k % 3 == 0), [
            lambda key, item: item + 1
        ]))
        keys = await chain.keys.all()
        cached = await CachedDataset(chain).fill()
        assert await PickledDataset.create(chain, path) == len(keys)
        async with await PickledDataset.open(path) as stored:
            batches = [batch async for _, batch in stored.batches(10)]
        legacy = from_sync(Blocking())
        return keys, dict(cached.cache), np.concatenate(batches), await legacy.query_item(1)

    keys, cache, items, legacy = run_trio(main)
    assert keys[:4] == [(0, 0), (0, 1), (3, 0), (3, 1)]
    assert [cache[key] for key in keys] == list(items)
    assert list(items[:4]) == [1, -1, 7, -7]
    assert legacy == 2


_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)


class Tagged(Slow):
    """Items that tell which request the caller set in its context."""

    async def query_item(self, key: int) -> Any:
        await anyio.lowlevel.checkpoint()
        return (key, _REQUEST.get())


def test_fetches_under_trio_see_the_callers_contextvars() -> None:
    async def main() -> list[Any]:
        _REQUEST.set("req-7")
        return [item async for _, batch in Tagged().batches(10, collate_fn=list) for item in batch]

    items = run_trio(main)
    assert items == [(key, "req-7") for key in range(100)]
