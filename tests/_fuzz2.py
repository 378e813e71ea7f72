"""Child process of the format 2 fuzz test: flip bits of a file, read it in every mode.

``python -m tests._fuzz2 FILE EXPECTED POSITIONS`` flips one bit of each
byte position of ``FILE`` in turn (restoring it after), reads the file in
every read mode and prints one JSON line per position: ``{mode: outcome}``
where the outcome is ``"corrupt"`` (CorruptFileError naming the file and,
for an item, its key), ``"unnamed"`` (CorruptFileError not naming them),
``"ok"`` (read back equal: the flip went unnoticed), ``"wrong"`` (read
back different, without error) or the name of another exception. A crash
of the interpreter shows as the child's exit status.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import sys
from typing import Any

import numpy as np

from mlworkflow_async import PickledDataset
from mlworkflow_async._core import _collate
from mlworkflow_async.exceptions import CorruptFileError

MODES = ("loop", "thread", "mmap", "safe", "batch")


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            and bool(np.array_equal(a, b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


async def read(path: str, mode: str, expected: dict[Any, Any]) -> bool:
    """Read everything in ``mode``; whether it all came back equal."""
    keys = list(expected)
    async with await PickledDataset.open(
        path, mmap=mode == "mmap", safe=mode == "safe"
    ) as ds:
        ds._reader.inline = ds._reader.inline and mode != "thread"
        good = list(await ds.keys.all()) == keys and len(ds) == len(keys)
        good &= ds.context == {"fuzz": True}
        if mode == "batch":
            collate = _collate.DEFAULT_COLLATE
            arrays = [k for k in keys if isinstance(expected[k], np.ndarray)]
            batch = await ds.query_batch(arrays, collate)
            good &= same(np.stack([expected[k] for k in arrays]), batch)
        items = await ds.query_items(keys)
        good &= all(same(expected[k], item) for k, item in zip(keys, items, strict=True))
        for key in keys:  # each alone too: the first read of a mapped array is checked
            good &= same(expected[key], await ds.query_item(key))
        return good


def outcome(path: str, mode: str, expected: dict[Any, Any], item_key: Any) -> str:
    try:
        good = asyncio.run(read(path, mode, expected))
    except CorruptFileError as exc:
        named = path in str(exc) and (item_key is None or repr(item_key) in str(exc))
        return "corrupt" if named else f"unnamed: {exc}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok" if good else "wrong"


def main(argv: list[str]) -> int:
    path, expected_path, positions_path = argv
    with open(expected_path, "rb") as f:
        expected, spans = pickle.load(f)  # spans: (offset, span, key) of each item
    with open(positions_path) as f:
        positions = json.load(f)
    fd = os.open(path, os.O_RDWR)
    try:
        for position in positions:
            original = os.pread(fd, 1, position)
            os.pwrite(fd, bytes([original[0] ^ (1 << position % 8)]), position)
            item_key = next((k for o, s, k in spans if o <= position < o + s), None)
            try:
                result = {m: outcome(path, m, expected, item_key) for m in MODES}
            finally:
                os.pwrite(fd, original, position)
            print(json.dumps([position, result]), flush=True)
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
