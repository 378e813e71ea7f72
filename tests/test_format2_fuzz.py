"""Fuzzing format 2: one flipped bit anywhere is an error naming the file (and the key).

Each damaged file is read in every mode (cached reads on the loop, reads in
a worker thread, ``mmap=True``, safe mode, batches read into place) by a
child process, so that a crash would show instead of killing the suite.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mlworkflow_async import PickledDataset

from ._pickled_util import write_file

ROOT = Path(__file__).resolve().parent.parent


def fuzz(tmp_path: Path, items: dict[Any, Any], positions: list[int] | None) -> dict[int, Any]:
    path = tmp_path / "fuzzed.pkl"
    write_file(path, items, {"fuzz": True})
    with PickledDataset(path) as ds:
        index = ds._reader.index
        spans = [(*index.entry(n)[:2], key) for n, key in enumerate(ds.yield_keys())]
    size = path.stat().st_size
    if positions is None:
        positions = list(range(size))
    expected = tmp_path / "expected.pkl"
    expected.write_bytes(pickle.dumps((items, spans)))
    listing = tmp_path / "positions.json"
    listing.write_text(json.dumps(positions))
    done = subprocess.run(
        [sys.executable, "-m", "tests._fuzz2", str(path), str(expected), str(listing)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    results = dict(json.loads(line) for line in done.stdout.splitlines())
    assert sorted(results) == sorted(positions)
    return results


def failures(results: dict[int, Any]) -> dict[int, Any]:
    return {
        position: {mode: got for mode, got in outcome.items() if got != "corrupt"}
        for position, outcome in results.items()
        if any(got != "corrupt" for got in outcome.values())
    }


def test_every_bit_of_a_small_file(tmp_path: Path) -> None:
    items: dict[Any, Any] = {
        "a": {"x": np.arange(4, dtype=np.float32), "y": 1},
        ("t", 2): [1, "two", 3.0],
        3: np.arange(6, dtype=np.int16).reshape(2, 3),
        "many": {"p": np.ones(2), "q": np.zeros(3, np.uint8)},
        "s": "text",
    }
    results = fuzz(tmp_path, items, None)
    assert failures(results) == {}


def test_a_dense_sample_of_a_file_with_large_arrays(tmp_path: Path) -> None:
    items: dict[Any, Any] = {
        0: np.arange(270_000, dtype=np.float32),  # 1.08 MB: mapped
        1: np.full(270_000, 7, dtype=np.float32),
        "small": {"x": np.arange(10)},
    }
    path = tmp_path / "probe.pkl"
    write_file(path, items, {"fuzz": True})
    size = path.stat().st_size
    with PickledDataset(path) as ds:
        data_end = ds._reader.index.data_end
        starts = [ds._reader.index.entry(n)[0] for n in range(3)]
    positions = set(range(0, 64))  # the header
    for start in starts:  # each item's pickle and first bytes
        positions.update(range(start, start + 100))
    positions.update(range(64, data_end, 16411))  # through the arrays
    positions.update(range(data_end, size))  # the whole index region and footer
    results = fuzz(tmp_path, items, sorted(p for p in positions if p < size))
    assert failures(results) == {}
