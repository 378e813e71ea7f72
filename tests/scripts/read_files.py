"""Read PickledDataset files in every mode, in a process a crash may kill.

Usage: ``python read_files.py JOB.json``. The job lists ``files`` (paths) and
``progress`` (a path). Before each read, ``FILE_INDEX MODE`` is appended to
the progress file, so that a crash or a hang names what it was reading. The
outcomes go to stdout as one JSON object: for each file, ``{mode: outcome}``
where an outcome is ``"ok"`` or the error's class name, and ``messages`` for
errors of any other kind (which tests treat as failures).

A mode is ``safe|unsafe``, ``mmap|read``, and ``open`` or how items are
read: ``item`` (``await query_item`` for each key) and ``batches`` (``async
for ... in batches(1)``), both on the loop, and ``items`` (one
``query_items`` call, in a worker thread), in every open mode; ``sync`` (the
blocking view's ``batches(1)``), in one open mode per file, in turn.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlworkflow_async import PickledDataset, PickledFileError


def expected(error: BaseException) -> bool:
    """The documented errors: the file's own, and KeyError for a key that changed."""
    return isinstance(error, (PickledFileError, KeyError))


OPEN_MODES = tuple((safe, mmap) for safe in (False, True) for mmap in (False, True))


def record(outcomes: dict[str, str], messages: list[str], mode: str, error: Any) -> None:
    outcomes[mode] = "ok" if error is None else type(error).__name__
    if error is not None and not expected(error):
        messages.append(f"{mode}: {type(error).__name__}: {error}"[:500])


def note(progress: Any, index: int, mode: str) -> None:
    progress.write(f"{index} {mode}\n")
    progress.flush()


def prefix(safe: bool, mmap: bool) -> str:
    return f"{'safe' if safe else 'unsafe'}/{'mmap' if mmap else 'read'}"


async def read_async(
    path: str, index: int, progress: Any
) -> tuple[dict[str, str], list[str], PickledDataset | None]:
    """Every open mode, read with ``query_item``, ``query_items`` and ``batches``.

    Also returns the dataset opened in this file's turn for the blocking view.
    """
    outcomes: dict[str, str] = {}
    messages: list[str] = []
    for_sync = None
    for turn, (safe, mmap) in enumerate(OPEN_MODES):
        mode = prefix(safe, mmap)
        note(progress, index, f"{mode}/open")
        try:
            ds = PickledDataset(path, safe=safe, mmap=mmap)
        except Exception as exc:
            record(outcomes, messages, f"{mode}/open", exc)
            continue
        keys = list(ds.yield_keys())
        _ = ds.context
        for access in ("item", "items", "batches"):
            note(progress, index, f"{mode}/{access}")
            # Items in the page cache are read on the loop; the other path, in
            # a worker thread, is taken by one query_items call.
            ds._reader.inline = access != "items"
            try:
                if access == "item":
                    for key in keys:
                        await ds.query_item(key)
                elif access == "items":
                    await ds.query_items(keys)
                else:
                    async for _ in ds.batches(1):
                        pass
                error = None
            except Exception as exc:
                error = exc
            record(outcomes, messages, f"{mode}/{access}", error)
        if turn == index % len(OPEN_MODES):
            for_sync = ds
        else:
            ds.close()
    return outcomes, messages, for_sync


def read_sync(ds: PickledDataset) -> BaseException | None:
    ds._reader.inline = True
    try:
        with ds:
            for _ in ds.sync.batches(1):
                pass
    except Exception as exc:
        return exc
    return None


def main(job_path: str) -> None:
    from mlworkflow_async._core._portal import get_portal

    job = json.loads(Path(job_path).read_text())
    # The async reads run on the loop the blocking view uses: one loop, one
    # thread hop per file.
    portal = get_portal()
    results = []
    with open(job["progress"], "a") as progress:
        for index, path in enumerate(job["files"]):
            outcomes, messages, ds = portal.call(read_async, path, index, progress)
            if ds is not None:
                # The blocking view reads through the same async code, one thread
                # hop per batch: each file goes through it in one open mode, in turn.
                safe, mmap = OPEN_MODES[index % len(OPEN_MODES)]
                mode = f"{prefix(safe, mmap)}/sync"
                note(progress, index, mode)
                record(outcomes, messages, mode, read_sync(ds))
            results.append({"outcomes": outcomes, "messages": messages})
        progress.write("done\n")
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
