"""Keys holding sets or frozensets are found in any process, whatever its hash seed.

The pickler writes a set's elements in iteration order, which follows the
hash seed (``PYTHONHASHSEED``); format 2 spells such keys with each set's
elements in the order of their own bytes. Files are written by a child
process under one seed and read by others under other seeds.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from mlworkflow_async._store import _spelled_keys
from mlworkflow_async._store._format2 import key_bytes

ROOT = Path(__file__).resolve().parent.parent


class Tagged(NamedTuple):
    name: str
    tags: frozenset[str]


class Bag:
    """A hashable key whose state holds a (mutable) set."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bag) and self.names == other.names

    def __hash__(self) -> int:
        return hash(frozenset(self.names))

    def __repr__(self) -> str:
        return f"Bag({sorted(self.names)})"


WORDS = [f"word{i}" for i in range(12)]
KEYS: list[Any] = [
    frozenset(WORDS),
    (frozenset(WORDS[:6]), 3),
    Tagged("t", frozenset(WORDS[3:9])),
    frozenset({frozenset(WORDS[:4]), frozenset(WORDS[4:8]), "x"}),
    (("deep", (frozenset(WORDS[::2]),)),),
    frozenset({1.5, "a", b"b", None, (1, "z")}),
    Bag(set(WORDS)),
    frozenset(),
    "plain",
]

#: Run by the children: ``write PATH`` or ``read PATH``, printing what was found.
CHILD = """
import asyncio, json, sys
from mlworkflow_async import DictDataset, PickledDataset
from tests.test_format2_set_keys import KEYS, Bag, Tagged
action, path = sys.argv[1], sys.argv[2]
if action == "write":
    source = DictDataset({key: number for number, key in enumerate(KEYS)})
    asyncio.run(PickledDataset.create(source, path))
else:
    found = {}
    for safe in (False, True):
        with PickledDataset(path, safe=safe, allow=(Tagged, Bag)) as ds:
            items = [ds.sync.query_item(key) for key in KEYS]
            found[str(safe)] = [items == list(range(len(KEYS))), ds.yield_keys() == KEYS]
    print(json.dumps(found))
"""


def run(action: str, path: Path, seed: int) -> str:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, action, str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        env={**os.environ, "PYTHONHASHSEED": str(seed)},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout


@pytest.mark.parametrize("write_seed", [1, 7])
def test_keys_holding_sets_are_found_under_other_hash_seeds(
    tmp_path: Path, write_seed: int
) -> None:
    path = tmp_path / "sets.pkl"
    run("write", path, write_seed)
    for seed in (2, 3, write_seed):
        found = json.loads(run("read", path, seed))
        assert found == {"False": [True, True], "True": [True, True]}, seed


def test_equal_keys_holding_sets_are_spelled_alike_in_one_process() -> None:
    # Equal sets built in other orders iterate in other orders (collisions).
    one = frozenset(range(0, 64, 8)) | {"a", "b"}
    other = frozenset(["b", "a", *reversed(range(0, 64, 8))])
    assert one == other
    assert key_bytes((one, 1)) == key_bytes((other, 1))
    assert pickle.loads(key_bytes((one, 1))) == (one, 1)


@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
def test_the_spelling_unpickles_to_the_key(key: Any) -> None:
    data = key_bytes(key)
    assert pickle.loads(data) == key
    assert _spelled_keys.holds_sets(data) == (key != "plain")
    if key != "plain":
        assert data == _spelled_keys.canonical_key_bytes(key)
