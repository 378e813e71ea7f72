"""Seeded shuffling and sharding: the same everywhere, a permutation, split exactly by rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlworkflow_async import DictDataset
from mlworkflow_async._core._order import KnownOrder, Permutation

ROOT = Path(__file__).resolve().parent.parent


def epoch_keys(n: int, size: int = 7, **kw: Any) -> list[list[Any]]:
    ds = DictDataset({f"key{i}": i for i in range(n)})
    return [keys for keys, _ in ds.sync.batches(size, **kw)]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 100, 1000, 4097])
def test_the_permutation_is_a_bijection(n: int) -> None:
    for seed, epoch in [(0, 0), (1, 0), (0, 1), (-5, 3), (2**40, 7)]:
        out = Permutation(n, seed, epoch)(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))


def test_the_order_depends_on_seed_and_epoch() -> None:
    base = epoch_keys(200, shuffle=1, epoch=0)
    assert sorted(k for keys in base for k in keys) == sorted(f"key{i}" for i in range(200))
    assert epoch_keys(200, shuffle=1, epoch=0) == base  # reproducible
    assert epoch_keys(200, shuffle=1, epoch=1) != base  # a new order each epoch
    assert epoch_keys(200, shuffle=2, epoch=0) != base
    assert epoch_keys(200) != base  # shuffled at all


def test_the_shuffle_mixes_well() -> None:
    # Neighbours in the order are not neighbours in the keys, and no epoch
    # of many repeats the order of another.
    n = 10_000
    orders = [Permutation(n, 3, e)(np.arange(n)) for e in range(20)]
    for order in orders:
        assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.05
        first = order[:100]  # the first batch covers the whole range
        assert first.min() < n // 10
        assert first.max() > n - n // 10
    firsts = {tuple(order[:8].tolist()) for order in orders}
    assert len(firsts) == 20
    # Each position sees many different keys across epochs.
    assert len({int(order[0]) for order in orders}) >= 18


def test_the_first_shuffled_batch_mixes_labels() -> None:
    # Keys sorted by label (as in the demo): the first batch must not be all one label.
    ds = DictDataset({(label, i): label for label in range(8) for i in range(250)})
    _, batch = next(iter(ds.sync.batches(64, shuffle=0)))
    assert len(set(batch.tolist())) >= 6


ORDER_SCRIPT = """
import json, sys
from mlworkflow_async import DictDataset
ds = DictDataset({("k", i): i for i in range(3000)})
out = [keys for keys, _ in ds.sync.batches(50, shuffle=123, epoch=4, shard=(1, 3))]
print(json.dumps(out))
"""


def test_the_same_order_in_other_processes_whatever_the_hash_seed() -> None:
    outputs = []
    for hash_seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", ORDER_SCRIPT], capture_output=True, text=True,
            timeout=60, cwd=ROOT, env=env,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    here = epoch_keys_tuples()
    assert json.loads(outputs[0]) == here


def epoch_keys_tuples() -> list[list[list[Any]]]:
    ds = DictDataset({("k", i): i for i in range(3000)})
    return [[list(k) for k in keys]
            for keys, _ in ds.sync.batches(50, shuffle=123, epoch=4, shard=(1, 3))]


@pytest.mark.parametrize("n", [0, 1, 5, 23, 64, 100, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("shuffle", [None, 5])
def test_shards_are_disjoint_and_cover_the_epoch(n: int, world: int, shuffle: int | None) -> None:
    size = 4
    per_rank = [epoch_keys(n, size, shuffle=shuffle, shard=(r, world)) for r in range(world)]
    flat = [k for batches in per_rank for keys in batches for k in keys]
    assert sorted(flat) == sorted(f"key{i}" for i in range(n))  # every key exactly once
    counts = [len(batches) for batches in per_rank]
    assert max(counts) - min(counts) <= 1
    if shuffle is not None and world > 1 and n > 20:
        # Ranks agree on the permutation: together, rank by rank, they are its order.
        whole = [k for keys in epoch_keys(n, size, shuffle=shuffle) for k in keys]
        assert [k for keys in per_rank[0] for k in keys] == whole[0::world]


@pytest.mark.parametrize("n", [0, 3, 23, 100, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_drop_incomplete_gives_every_rank_the_same_batches(n: int, world: int) -> None:
    size = 4
    per_rank = [
        epoch_keys(n, size, shuffle=1, shard=(r, world), drop_incomplete=True)
        for r in range(world)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(keys) == size for batches in per_rank for keys in batches)
    flat = [k for batches in per_rank for keys in batches for k in keys]
    assert len(flat) == len(set(flat)) == (n // world // size) * size * world


def test_known_order_maps_units_without_a_copy_of_the_indices() -> None:
    keys = list(range(1_000_000))
    tracemalloc.start()
    try:
        order = KnownOrder(keys, 64, seed=1, epoch=2, shard=(3, 4))
        unit = order.unit_keys(1234)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 20_000  # constant: a few round keys, not 1M shuffled indices (8 MB)
    assert len(unit) == 64
    assert order.units == -(-250_000 // 64)
    assert order.unit_keys(order.units) == []
    assert len(set(unit)) == 64


@pytest.mark.parametrize(
    ("shard", "error", "message"),
    [
        ((2, 2), ValueError, r"0 <= rank < world_size, got \(2, 2\)"),
        ((-1, 2), ValueError, r"0 <= rank < world_size"),
        ((0, 0), ValueError, r"world_size >= 1"),
        ((0.5, 2), TypeError, r"shard must be a pair of integers \(rank, world_size\)"),
        ((True, 2), TypeError, r"pair of integers"),
        ((1,), TypeError, r"pair of integers"),
        (1, TypeError, r"pair of integers"),
    ],
)
def test_wrong_shards_are_refused_clearly(shard: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        DictDataset({1: 1}).batches(2, shard=shard)


def test_numpy_integers_are_accepted_as_a_shard() -> None:
    got = epoch_keys(10, 2, shard=(np.int64(1), np.int64(2)))
    assert [k for keys in got for k in keys] == [f"key{i}" for i in range(1, 10, 2)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shuffle": True}, "shuffle takes an integer seed"),
        ({"shuffle": 0.5}, "shuffle takes an integer seed"),
        ({"epoch": -1}, "epoch must be an integer of at least 0"),
        ({"epoch": 1.5}, "epoch must be an integer of at least 0"),
    ],
)
def test_wrong_shuffle_arguments_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        DictDataset({1: 1}).batches(2, **options)


def test_the_demo_shows_a_shuffled_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    from mlworkflow_async.__main__ import main

    assert main(["demo", "--items", "800"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "shuffle=0" in x)
    counts = json.loads(line[line.index("[") : line.index("]") + 1])
    assert sum(counts) == 64
    assert sum(1 for c in counts if c) >= 5  # not all one label, as a plain order would be
