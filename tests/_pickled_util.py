"""Keys, items and sources shared by the PickledDataset tests (importable by child processes)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mlworkflow_async import Dataset, PickledDataset


class Key(NamedTuple):
    name: str
    index: int


class Point:
    """A user class, for safe-mode allow lists."""

    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


class RunsCommand:
    """Unpickling this runs a shell command: the classic malicious pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def small_items(n: int) -> dict[Key, dict[str, Any]]:
    rng = np.random.default_rng(n)
    return {
        Key("k", i): {"x": rng.random(10, dtype=np.float32), "y": i, "tag": ("t", i)}
        for i in range(n)
    }


def assert_same(a: Any, b: Any) -> None:
    """Deep equality that compares numpy arrays by dtype, shape and values."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        if a.dtype.hasobject:
            assert a.tolist() == b.tolist()
        else:
            np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert type(a) is type(b)
        assert a == b


class Gated(Dataset[int, Any]):
    """Items ``0..n-1``; asking for a key at or past ``gate_at`` waits for ``release``.

    ``reached`` is set when a fetch first waits, so a test knows the writer
    is midway. ``fail_at`` makes that key raise instead.
    """

    def __init__(self, n: int, gate_at: int | None = None, fail_at: int | None = None) -> None:
        self.n, self.gate_at, self.fail_at = n, gate_at, fail_at
        self.reached: asyncio.Event | None = None
        self.release: asyncio.Event | None = None
        self.context = {"made_by": "Gated"}

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> Any:
        return (await self.query_items([key]))[0]

    async def query_items(self, keys: Sequence[int]) -> list[Any]:
        if self.reached is None:
            self.reached, self.release = asyncio.Event(), asyncio.Event()
        assert self.release is not None
        for key in keys:
            if key == self.fail_at:
                raise RuntimeError(f"source failed at {key}")
            if self.gate_at is not None and key >= self.gate_at:
                self.reached.set()
                await self.release.wait()
        return [{"i": k, "x": np.full(64, k, dtype=np.int32)} for k in keys]


def read_keys(dataset: PickledDataset, keys: list[Any]) -> list[Any]:
    """Run in another process: read ``keys`` with the blocking view."""
    return dataset.sync.query_items(keys)


def leftovers(folder: str) -> list[str]:
    """Temporary files left in ``folder`` by an unfinished write."""
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def write_file(
    path: Any, items: dict[Any, Any], context: dict[str, Any] | None = None, version: int = 2
) -> None:
    """Write ``items`` (and ``context``) in this library's format (``version`` 1 or 2)."""
    from mlworkflow_async import DictDataset

    source = DictDataset(items)
    if context is not None:
        source.context = context  # type: ignore[attr-defined]
    asyncio.run(PickledDataset.create(source, path, format_version=version))


def write_original_file(
    path: Any, items: dict[Any, Any], context: dict[str, Any] | None = None
) -> None:
    """Write ``items`` (and ``context``) with the real original library."""
    import mlworkflow

    source = mlworkflow.DictDataset(items)
    if context is not None:
        source._context = context  # where the original looks for it
    mlworkflow.PickledDataset.create(source, str(path))


READER_SCRIPT = Path(__file__).parent / "scripts" / "read_files.py"


def read_in_subprocess(
    files: list[Path], folder: Path, names: list[str] | None = None, timeout: float = 120
) -> list[dict[str, Any]]:
    """Read each file in every mode in a child process (see ``scripts/read_files.py``).

    Returns one ``{"outcomes": {mode: outcome}, "messages": [...]}`` per file.
    A crash or a hang fails with the name (``names[i]``, else the path) of the
    file and the mode being read, taken from the child's progress file.
    """
    # A unique name: callers run several children at once from threads, and a
    # name counted from the folder's listing would let two of them share a job.
    job = folder / f"job-{os.getpid()}-{uuid.uuid4().hex}.json"
    progress = job.with_suffix(".progress")
    job.write_text(json.dumps({"files": [str(f) for f in files], "progress": str(progress)}))
    try:
        child = subprocess.run(
            [sys.executable, str(READER_SCRIPT), str(job)],
            capture_output=True, text=True, timeout=timeout,
        )
        failure = None if child.returncode == 0 else (
            f"exit status {child.returncode}: {child.stderr[-2000:]}"
        )
    except subprocess.TimeoutExpired:
        child, failure = None, f"no answer after {timeout} s"
    if failure is not None:
        lines = progress.read_text().splitlines() if progress.exists() else []
        where = "before reading anything"
        if lines and lines[-1] == "done":
            where = "after reading every file (at exit)"
        elif lines:
            index, mode = lines[-1].split(" ", 1)
            name = names[int(index)] if names else str(files[int(index)])
            where = f"while reading {name} ({mode})"
        raise AssertionError(f"the reading process failed {where}: {failure}")
    assert child is not None
    results: list[dict[str, Any]] = json.loads(child.stdout)["results"]
    return results
