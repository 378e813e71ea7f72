"""The blocking stream: batches taken ahead, the state as of what the script received."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import Dataset, DictDataset

from ._forking import refusal_in_forked_child


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Block until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition was not reached in time"
        time.sleep(0.001)


def parked(stream: Any) -> int:
    return len(stream._handoff._parked)


def test_the_state_counts_only_the_batches_the_script_received() -> None:
    items = {i: i for i in range(200)}
    stream = DictDataset(items).sync.batches(4, shuffle=7)
    first, _ = next(stream)
    wait_for(lambda: parked(stream) >= 8)  # taken ahead, not received
    state = stream.state_dict()
    stream.close()
    resumed = DictDataset(items).sync.batches(4, shuffle=7, resume=state)
    rest = [key for keys, _ in resumed for key in keys]
    assert len(first) + len(rest) == 200
    assert sorted(first + rest) == list(range(200))


class FailsAt9(Dataset[int, int]):
    def yield_keys(self) -> range:
        return range(20)

    async def query_item(self, key: int) -> int:
        if key == 9:
            raise ValueError("key 9 is bad")
        return key


def test_an_error_comes_after_the_batches_before_it() -> None:
    stream = FailsAt9().sync.batches(2)
    received: list[int] = []
    with pytest.raises(ValueError, match="key 9 is bad"):
        for keys, _ in stream:
            received += keys
    assert received == list(range(8))
    with pytest.raises(StopIteration):
        next(stream)


@pytest.mark.parametrize(
    ("item", "collate", "ahead"),
    [
        (lambda key: key, None, 16),  # small arrays: the most
        (lambda key: np.zeros(4 << 20, np.uint8), None, 4),  # 16 MiB a batch: 64 MiB
        (lambda key: {"n": key}, list, 2),  # lists of anything: size unknown
    ],
)
def test_batches_taken_ahead_are_bounded_by_their_arrays(
    item: Callable[[int], Any], collate: Any, ahead: int
) -> None:
    ds = DictDataset({key: item(key) for key in range(100)})
    stream = ds.sync.batches(4, collate_fn=collate)
    next(stream)
    assert stream._handoff._ahead == ahead
    wait_for(lambda: parked(stream) == ahead)
    most = ahead
    count = 1
    for _ in stream:
        most = max(most, parked(stream))
        count += 1
    assert most == ahead
    assert count == 25


def test_leaving_the_loop_stops_taking_batches() -> None:
    stream = DictDataset({i: i for i in range(1000)}).sync.batches(4)
    for _ in stream:
        break
    handoff = stream._handoff
    wait_for(lambda: len(handoff._parked) == 16)  # waiting for room
    del stream  # as leaving a loop over ds.sync.batches(...) does
    gc.collect()
    assert handoff._task is not None
    wait_for(handoff._task.done)
    assert handoff._task.cancelled()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_stream_inherited_by_a_forked_child_refuses_clearly(tmp_path: Path) -> None:
    # The child has no thread taking the batches: waiting for one would hang.
    stream = DictDataset({i: i for i in range(100)}).sync.batches(4)
    first, _ = next(stream)
    assert first == [0, 1, 2, 3]
    message = refusal_in_forked_child(
        tmp_path, lambda: next(stream), stream.close, RuntimeError
    )
    assert "forked process" in message
    assert [key for keys, _ in stream for key in keys] == list(range(4, 100))  # the parent's
