"""A format 2 file truncated in place while open raises CorruptFileError, never SIGBUS.

The index of a local file is mapped: touching a map past the end of its file
kills the process. Each case runs in a child process, so that a crash shows
as its exit status instead of killing the suite.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlworkflow_async import DictDataset, PickledDataset

ROOT = Path(__file__).resolve().parent.parent

#: Run by the child: open the file, shrink it, do ``ACTION``, print what it raised.
CHILD = """
import asyncio, os, sys
from mlworkflow_async import PickledDataset
path, action = sys.argv[1], sys.argv[2]
ds = PickledDataset(path, mmap=action.startswith("mapped"))
cut = 100
if action == "closed context":
    ds.close()
elif action == "mapped array":
    # As if the file shrank during a batch, after its check and lookups: the
    # array's read must check again before hashing its map. Cut inside it.
    entries = ds._reader.locate(["big"])
    ds._reader.locate = lambda keys: entries
    ds._reader._unmapped_sum(entries[0][0])  # looked up now, as in the batch's first steps
    ds._reader.populate = False  # no MADV_POPULATE_READ to fail first
    cut = entries[0][0] + entries[0][3][0][0] + (64 << 10)
os.truncate(path, cut)
try:
    if action == "keys":
        ds.yield_keys()
    elif action == "async keys":
        asyncio.run(ds.keys.all())
    elif action in ("context", "closed context"):
        ds.context
    elif action == "key_of":
        ds._reader.index.key_of(3)
    elif action == "verify":
        ds._reader.verify_file()
    elif action == "mapped array":
        ds.sync.query_item("big")
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("no error")
"""


@pytest.fixture
def big_index(tmp_path: Path) -> Path:
    """A file whose index spans many pages (string keys), with a context and a mapped array."""
    items: dict[object, object] = {f"key {i}": i for i in range(20_000)}
    items["big"] = np.ones(300_000)
    source = DictDataset(items)
    source.context = {"note": "kept"}  # type: ignore[attr-defined]
    path = tmp_path / "shrinks.pkl"
    asyncio.run(PickledDataset.create(source, path))
    return path


@pytest.mark.parametrize(
    "action",
    ["keys", "async keys", "context", "closed context", "key_of", "verify", "mapped array"],
)
def test_reads_of_a_file_truncated_after_opening_raise(big_index: Path, action: str) -> None:
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(big_index), action],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    out = child.stdout.strip()
    assert out.startswith("CorruptFileError"), out
    assert str(big_index) in out
    assert "truncated" in out or "past the end" in out, out


def test_the_size_check_keeps_no_reader_alive(big_index: Path) -> None:
    # The index calls its reader back; a cycle would keep the maps of a dropped
    # dataset (and the file's filesystem busy) until a garbage collection.
    import gc
    import weakref

    gc.disable()
    try:
        ds = PickledDataset(big_index)
        reader = weakref.ref(ds._reader)
        ds.close()
        del ds
        assert reader() is None
    finally:
        gc.enable()
