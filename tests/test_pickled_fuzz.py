"""Every byte of a small file flipped, read in every mode: documented errors only, never a crash.

The reads run in child processes (a crash must not take the test run with
it), many flipped files per child; a crash or a hang names the byte. A
second file format joins by adding its writer to ``WRITERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ._pickled_util import read_in_subprocess, write_file, write_original_file

#: A bit of everything the formats hold: arrays sent out-of-band and through
#: numpy's own pickles (Fortran order, structured, objects, datetimes), numpy
#: scalars, tuples, strings, and a context.
ITEMS: dict[Any, Any] = {
    "a": {"x": np.arange(6, dtype=np.float32), "y": np.int64(3), "t": ("a", 1, 2.5)},
    ("b", 2): (np.asfortranarray(np.arange(4, dtype=np.int16).reshape(2, 2)), np.float32(0.5)),
    "c": {"s": np.zeros(2, dtype="i4,f8"), "d": np.array(["2024-01-01"], dtype="M8[D]"),
          "b": np.bytes_(b"xy")},
    "o": np.array([1, "two"], dtype=object),
    "e": [],
}
CONTEXT = {"note": "ctx", "n": np.int32(7)}

#: How each format writes the sample; add one here to fuzz another format.
WRITERS: dict[str, Callable[[Path], None]] = {
    "format1": lambda path: write_file(path, ITEMS, CONTEXT),
    "original": lambda path: write_original_file(path, ITEMS, CONTEXT),
}
#: Every bit of each byte is flipped (one file per byte keeps the run short).
MASKS = (0xFF,)
#: Flipped files read per child process, and children at a time.
PER_CHILD = 450
CHILDREN = 2


@pytest.mark.timeout(900)  # about 15 ms of CPU per flipped file
@pytest.mark.parametrize("writer", WRITERS)
def test_every_flipped_byte_reads_safely(tmp_path: Path, writer: str) -> None:
    original = tmp_path / "original.pkl"
    WRITERS[writer](original)
    data = original.read_bytes()
    assert 400 < len(data) < 4000  # small enough to flip every byte
    baseline = read_in_subprocess([original], tmp_path)[0]
    # Safe mode refuses the object array; everything else reads.
    assert set(baseline["outcomes"].values()) <= {"ok", "UnsafePickleError"}
    assert baseline["outcomes"]["unsafe/read/items"] == "ok"

    files, names = [], []
    folder = tmp_path / "flipped"
    folder.mkdir()
    for offset in range(len(data)):
        for mask in MASKS:
            flipped = bytearray(data)
            flipped[offset] ^= mask
            path = folder / f"{offset}-{mask:02x}.pkl"
            path.write_bytes(flipped)
            files.append(path)
            names.append(f"{writer} file with byte {offset} XOR {mask:#04x}")

    chunks = [slice(start, start + PER_CHILD) for start in range(0, len(files), PER_CHILD)]
    with ThreadPoolExecutor(CHILDREN) as pool:  # each thread waits for its child
        answers = list(pool.map(
            lambda chunk: read_in_subprocess(files[chunk], tmp_path, names[chunk]), chunks
        ))
    unexpected: list[str] = []
    outcomes: set[str] = set()
    for chunk, results in zip(chunks, answers, strict=True):
        for name, result in zip(names[chunk], results, strict=True):
            outcomes.update(result["outcomes"].values())
            unexpected += [f"{name}: {message}" for message in result["messages"]]
    assert not unexpected, "\n".join(unexpected[:20])
    # The flips were seen: most files fail to read, some still read (wrong data
    # is possible where the format has no checksum to catch it).
    assert "CorruptFileError" in outcomes
