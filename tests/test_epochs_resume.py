"""Exact resume: state_dict() at any point, then resume= yields exactly what was not handed out."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import pytest

import mlworkflow_async.sync as blocking
from mlworkflow_async import Dataset, DictDataset
from mlworkflow_async._core._order import KnownOrder
from mlworkflow_async.exceptions import ResumeError

ROOT = Path(__file__).resolve().parent.parent


class Jittery(Dataset[int, int]):
    """Items that complete out of order (a fixed delay pattern), counting every read."""

    def __init__(self, n: int, lazy: bool = False) -> None:
        self.n = n
        self.lazy = lazy
        self.read: list[int] = []

    def yield_keys(self) -> Iterable[int]:
        return (i for i in range(self.n)) if self.lazy else list(range(self.n))

    async def query_item(self, key: int) -> int:
        self.read.append(key)
        await anyio.sleep((key * 7919 % 13) / 4000)
        return key


async def run(
    ds: Dataset[int, Any], state: dict[str, Any] | None = None, **kw: Any
) -> list[list[int]]:
    return [keys async for keys, _ in ds.batches(4, concurrency=8, resume=state, **kw)]


async def cut_at(
    ds: Dataset[int, Any], count: int, **kw: Any
) -> tuple[list[list[int]], dict[str, Any]]:
    stream = ds.batches(4, concurrency=8, **kw)
    got = [(await anext(stream))[0] for _ in range(count)]
    state = json.loads(json.dumps(stream.state_dict()))  # as a checkpoint file holds it
    await stream.aclose()
    return got, state


CASES = [
    {},
    {"shuffle": 3},
    {"shard": (1, 3)},
    {"shuffle": 5, "shard": (0, 2)},
    {"shuffle": 5, "epoch": 2, "shard": (1, 2), "drop_incomplete": True},
    {"ordered": False},
    {"ordered": False, "shuffle": 3},
    {"ordered": False, "shuffle": 7, "shard": (1, 2)},
    {"ordered": False, "drop_incomplete": True},
]


def _name(kw: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "plain"


@pytest.mark.parametrize("kw", CASES, ids=_name)
async def test_resume_at_every_batch_hands_out_exactly_the_rest(kw: dict[str, Any]) -> None:
    full = await run(Jittery(41), **kw)
    assert full
    for count in range(len(full) + 1):
        ds = Jittery(41)
        got, state = await cut_at(ds, count, **kw)
        fresh = Jittery(41)
        rest = await run(fresh, state, **kw)
        if kw.get("ordered", True):
            assert got + rest == full
            # Nothing handed out before is read again.
            assert not set(fresh.read) & {k for keys in got for k in keys}
        else:
            # Completion order: the same batches, none lost, none twice.
            assert sorted(map(tuple, got + rest)) == sorted(map(tuple, full))
        assert len(state["done"]) <= 8  # bounded by concurrency, not by the epoch


@pytest.mark.parametrize(
    "kw", [{}, {"ordered": False}, {"ordered": False, "drop_incomplete": True}], ids=_name
)
async def test_resume_with_keys_discovered_lazily(kw: dict[str, Any]) -> None:
    full = await run(Jittery(30, lazy=True), **kw)
    for count in range(len(full) + 1):
        got, state = await cut_at(Jittery(30, lazy=True), count, **kw)
        rest = await run(Jittery(30, lazy=True), state, **kw)
        assert sorted(map(tuple, got + rest)) == sorted(map(tuple, full))
        if kw.get("ordered", True):
            assert got + rest == full


async def test_completion_order_with_drop_incomplete_hands_out_every_full_batch() -> None:
    # The short last batch used to end a completion-order stream as soon as
    # it completed, losing the full batches still in flight.
    batches = await run(Jittery(41, lazy=True), ordered=False, drop_incomplete=True)
    assert sorted(k for keys in batches for k in keys) == list(range(40))


async def test_a_state_saved_before_the_first_batch_resumes_from_the_start() -> None:
    stream = Jittery(10).batches(4, shuffle=1)
    state = stream.state_dict()
    assert state["keys"] is None
    assert state["position"] == 0
    assert await run(Jittery(10), state, shuffle=1) == await run(Jittery(10), shuffle=1)


async def test_state_dict_is_small_and_names_what_defines_the_order() -> None:
    stream = DictDataset({i: i for i in range(1000)}).batches(
        10, shuffle=4, epoch=2, shard=(1, 4), concurrency=4
    )
    await anext(stream)
    state = stream.state_dict()
    await stream.aclose()
    assert state == {
        "format": "mlworkflow_async.batches/1",
        "batch_size": 10,
        "shuffle": 4,
        "epoch": 2,
        "shard": [1, 4],
        "drop_incomplete": False,
        "ordered": True,
        "keys": {"count": 1000, "fingerprint": state["keys"]["fingerprint"]},
        "position": 1,
        "done": [],
    }
    assert len(json.dumps(state)) < 400


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"batch_size": 5}, r"batch_size=4 \(now batch_size=5\)"),
        ({"shuffle": 2}, r"shuffle=1 \(now shuffle=2\)"),
        ({"epoch": 1}, r"epoch=0 \(now epoch=1\)"),
        ({"shard": (0, 2)}, r"shard=None \(now shard=\[0, 2\]\)"),
        ({"ordered": False}, r"ordered=True \(now ordered=False\)"),
        ({"drop_incomplete": True}, r"drop_incomplete=False \(now drop_incomplete=True\)"),
    ],
)
async def test_arguments_that_disagree_with_the_state_are_named(
    changed: dict[str, Any], message: str
) -> None:
    _, state = await cut_at(Jittery(20), 1, shuffle=1)
    options: dict[str, Any] = {"shuffle": 1, "batch_size": 4, **changed}
    size = options.pop("batch_size")
    with pytest.raises(ResumeError, match=rf"cannot resume: the saved stream had {message}"):
        Jittery(20).batches(size, resume=state, **options)


async def test_changed_keys_are_detected() -> None:
    _, state = await cut_at(Jittery(20), 2, shuffle=1)
    with pytest.raises(ResumeError, match="there were 20 keys, there are 21 now"):
        await run(Jittery(21), state, shuffle=1)
    renamed = DictDataset({str(i): i for i in range(20)})
    with pytest.raises(ResumeError, match="the 20 keys are not the same ones"):
        await run(renamed, state, shuffle=1)


@pytest.mark.parametrize("bad", [{}, {"format": "other"}, "position 3"])
def test_a_state_that_is_not_one_is_refused(bad: Any) -> None:
    with pytest.raises(ResumeError, match=r"resume= takes the dict returned by stream\.state_dict"):
        Jittery(5).batches(2, resume=bad)


async def test_a_malformed_position_is_refused() -> None:
    _, state = await cut_at(Jittery(20), 2)
    for position, done in [(-1, []), (2, [1]), ("2", [])]:
        with pytest.raises(ResumeError, match="saved position is malformed"):
            Jittery(20).batches(4, resume={**state, "position": position, "done": done})


async def test_resume_in_a_shuffled_million_key_epoch_reads_only_what_comes_next() -> None:
    n, size, at = 1_000_000, 64, 10_000
    order = KnownOrder(list(range(n)), size, seed=11, epoch=3)
    ahead = {k for unit in range(at, at + 10) for k in order.unit_keys(unit)}
    state = {
        "format": "mlworkflow_async.batches/1", "batch_size": size, "shuffle": 11, "epoch": 3,
        "shard": None, "drop_incomplete": False, "ordered": True,
        "keys": order.fingerprint(), "position": at, "done": [],
    }
    ds = Jittery(n)
    stream = ds.batches(size, shuffle=11, epoch=3, resume=state, concurrency=size)
    keys, batch = await anext(stream)
    await stream.aclose()
    assert keys == order.unit_keys(at)
    assert batch.tolist() == keys
    assert set(ds.read) <= ahead  # no item before batch 10,000 was read


def test_the_blocking_view_checkpoints_and_resumes() -> None:
    ds = DictDataset({i: i * 2 for i in range(50)})
    full = [keys for keys, _ in ds.sync.batches(8, shuffle=2, epoch=1)]
    stream = ds.sync.batches(8, shuffle=2, epoch=1)
    first = [next(stream)[0] for _ in range(3)]
    state = stream.state_dict()
    stream.close()
    rest = [keys for keys, _ in ds.sync.batches(8, shuffle=2, epoch=1, resume=state)]
    assert first + rest == full
    with pytest.raises(ResumeError, match="epoch=1 \\(now epoch=2\\)"):
        ds.sync.batches(8, shuffle=2, epoch=2, resume=state)


RESUME_SCRIPT = """
import json, sys
from mlworkflow_async.sync import PickledDataset
path, mode = sys.argv[1], sys.argv[2]
kw = dict(shuffle=9, epoch=1, shard=(1, 2), ordered=mode == "ordered")
with PickledDataset(path) as ds:
    if len(sys.argv) > 3:
        stream = ds.batches(16, resume=json.loads(sys.argv[3]), **kw)
        print(json.dumps([keys for keys, _ in stream]))
    else:
        stream = ds.batches(16, **kw)
        got = [next(stream)[0] for _ in range(5)]
        print(json.dumps({"got": got, "state": stream.state_dict()}))
        stream.close()
"""


@pytest.mark.parametrize("mode", ["ordered", "completion"])
def test_resume_in_another_process(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "items.pkl"
    blocking.PickledDataset.create(DictDataset({f"k{i}": i for i in range(300)}), path)

    def python(*args: str) -> Any:
        result = subprocess.run(
            [sys.executable, "-c", RESUME_SCRIPT, str(path), mode, *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = python()
    rest = python(json.dumps(first["state"]))
    with blocking.PickledDataset(path) as ds:
        full = [keys for keys, _ in ds.batches(16, shuffle=9, epoch=1, shard=(1, 2))]
    if mode == "ordered":
        assert first["got"] + rest == full
    else:
        assert sorted(map(tuple, first["got"] + rest)) == sorted(map(tuple, full))



async def test_a_state_saved_while_keys_streamed_resumes_once_they_are_known() -> None:
    # The first pass streams the keys and saves after two batches; by the
    # resume the same dataset knows all its keys, so the order is known-keys.
    ds = Jittery(30, lazy=True)
    full = await run(Jittery(30, lazy=True))
    got, state = await cut_at(ds, 2)
    await ds.keys.all()
    assert state["keys"]["count"] < 30
    rest = await run(ds, state)
    assert got + rest == full


async def test_a_known_keys_state_still_refuses_grown_keys_in_plain_order() -> None:
    # Only a state saved while keys streamed covers a prefix; a known-keys
    # state counted every key, so one more key is a changed dataset.
    _, state = await cut_at(Jittery(20), 2)
    with pytest.raises(ResumeError, match="there were 20 keys, there are 21 now"):
        await run(Jittery(21), state)
