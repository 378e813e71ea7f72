"""The blocking view: plain threads, and a clear refusal inside an event loop."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from mlworkflow_async import Dataset, DictDataset, KeysNotReadyError, SyncInLoopError


class Lazy(Dataset[int, int]):
    async def yield_keys(self) -> Any:
        for i in range(2500):
            yield i

    async def query_item(self, key: int) -> int:
        await asyncio.sleep(0)
        return key + 1


def test_sync_view_from_a_plain_thread() -> None:
    ds = Lazy()
    results: dict[str, Any] = {}

    def script() -> None:
        view = ds.sync
        try:
            len(view)
        except KeysNotReadyError:
            results["len_before"] = "not ready"
        results["keys"] = list(view.keys)
        results["all"] = view.keys.all()
        results["len"] = len(view)
        results["item"] = view.query_item(5)
        results["items"] = view.query_items([1, 2])
        results["query"] = view.query([3, 4]).tolist()
        results["batches"] = [(k[0], b.shape) for k, b in view.batches(1000, concurrency=50)]

    thread = threading.Thread(target=script)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert results["len_before"] == "not ready"
    assert results["keys"] == list(range(2500))
    assert results["all"] == list(range(2500))
    assert results["len"] == 2500
    assert results["item"] == 6
    assert results["items"] == [2, 3]
    assert results["query"] == [4, 5]
    assert results["batches"] == [(0, (1000,)), (1000, (1000,)), (2000, (500,))]


def test_sync_batches_can_be_closed_early() -> None:
    ds = DictDataset({i: i for i in range(100)})
    with ds.sync.batches(10) as batches:
        keys, _ = next(batches)
        assert keys == list(range(10))
    with pytest.raises(StopIteration):
        next(batches)


INTERRUPTED = textwrap.dedent(
    """
    import asyncio, sys, threading
    sys.path.insert(0, {repo!r})
    from mlworkflow_async import Dataset

    stopped = threading.Event()

    class Stuck(Dataset):
        def yield_keys(self):
            return [0]

        async def query_item(self, key):
            try:
                print("waiting", flush=True)
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopped.set()
                raise

    try:
        {call}
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    print("cancelled" if stopped.wait(30) else "still running", flush=True)
    """
)


@pytest.mark.parametrize(
    "call", ["Stuck().sync.query_item(0)", "next(Stuck().sync.batches(1))"]
)
def test_ctrl_c_during_a_blocking_call_cancels_its_work(call: str) -> None:
    # The call's coroutine runs on the background loop: interrupting the script
    # that waits for it must stop it, not leave it running unseen.
    code = INTERRUPTED.format(repo=str(Path(__file__).resolve().parents[1]), call=call)
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "waiting"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert out.split() == ["interrupted", "cancelled"], (out, err)


def test_sync_item_error_is_raised_in_the_script() -> None:
    ds = DictDataset({1: "a"})
    with pytest.raises(KeyError, match="42"):
        ds.sync.query_item(42)


async def test_sync_view_refuses_inside_a_running_loop() -> None:
    ds = DictDataset({1: "a"})
    for call in (
        lambda: ds.sync.query_item(1),
        lambda: ds.sync.query([1]),
        lambda: ds.sync.keys.all(),
        lambda: list(ds.sync.keys),
        lambda: ds.sync.batches(1),
    ):
        with pytest.raises(SyncInLoopError, match=r"(await|async for)"):
            call()
    assert issubclass(SyncInLoopError, RuntimeError)


def test_blocking_pickled_create_round_trip(tmp_path: Any) -> None:
    from mlworkflow_async.sync import PickledDataset

    path = tmp_path / "d.pkl"
    assert PickledDataset.create(DictDataset({i: {"v": i} for i in range(50)}), path) == 50
    with PickledDataset(path) as ds:
        assert len(ds) == 50
        assert ds.query_item(7) == {"v": 7}


async def test_blocking_pickled_create_refuses_inside_a_loop(tmp_path: Any) -> None:
    from mlworkflow_async.sync import PickledDataset

    with pytest.raises(SyncInLoopError, match=r"await mlworkflow_async\.PickledDataset\.create"):
        PickledDataset.create(DictDataset({1: 1}), tmp_path / "x.pkl")
    assert not (tmp_path / "x.pkl").exists()


def test_a_blocking_call_on_the_background_loop_refuses_instead_of_waiting_forever() -> None:
    from mlworkflow_async._core._portal import call, get_portal

    async def nested() -> None:
        async def inner() -> int:
            return 1

        call(inner)  # on the loop's thread: it would wait on itself

    with pytest.raises(RuntimeError, match="wait on itself"):
        get_portal().call(nested)


ON_THE_CALLING_THREAD = textwrap.dedent(
    """
    import sys, threading
    sys.path.insert(0, {repo!r})
    from mlworkflow_async import DictDataset, PickledDataset

    with PickledDataset({path!r}) as ds:
        got = [ds.sync.query_item(3), ds.sync.query_items([5, 0])]
        ds._reader.inline = False  # as if no page were cached: read here, blocking
        got += [ds.sync.query_item(4), ds.sync.query_items((1, 2))]
        try:
            ds.sync.query_item(99)
        except KeyError as exc:
            got.append(str(exc))
    got.append(DictDataset({{"a": 1}}).sync.query_items(["a"]))
    print(got)
    print(threading.active_count())
    """
)


def test_local_files_and_dicts_are_read_on_the_calling_thread(tmp_path: Path) -> None:
    # The blocking view reads a PickledDataset (and looks up a DictDataset) on the
    # script's thread: no event loop thread is started, the items are those of the
    # file, cached or not, and a missing key says so as the awaited call does.
    from mlworkflow_async import PickledDataset

    path = tmp_path / "d.pkl"
    asyncio.run(PickledDataset.create(DictDataset({i: f"v{i}" for i in range(10)}), path))
    code = ON_THE_CALLING_THREAD.format(repo=str(Path(__file__).resolve().parents[1]),
                                        path=str(path))
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == 0, child.stderr
    got, threads = child.stdout.splitlines()
    assert got == repr([
        "v3", ["v5", "v0"], "v4", ["v1", "v2"],
        f"'99 is not a key of the PickledDataset {path}'", [1],
    ])
    assert threads == "1"  # the script's own: no loop was needed


CHAIN_ON_THE_CALLING_THREAD = textwrap.dedent(
    """
    import sys, threading
    sys.path.insert(0, {repo!r})
    from mlworkflow_async import PickledDataset, Subset, TransformedDataset

    def scale(key, item):
        if key == 7:
            raise ValueError("no sevens")
        return item * 2

    async def shout(key, item):
        return item.upper()

    with PickledDataset({path!r}) as ds:
        chain = Subset(TransformedDataset(ds, [scale]), range(8))
        got = [chain.sync.query_item(3), chain.sync.query_items([1, 0])]
        for bad, error in ((7, ValueError), (9, KeyError)):
            try:
                chain.sync.query_item(bad)
            except error as exc:
                got.append([type(exc).__name__, *getattr(exc, "__notes__", [])])
        got.append(threading.active_count())
        # An async transform runs on the event loop: the view goes there for it.
        got.append(TransformedDataset(ds, [shout]).sync.query_item(2))
        got.append(threading.active_count() > 1)
    print(got)
    """
)


def test_plain_transform_chains_over_a_file_are_read_on_the_calling_thread(
    tmp_path: Path,
) -> None:
    from mlworkflow_async import PickledDataset

    path = tmp_path / "d.pkl"
    asyncio.run(PickledDataset.create(DictDataset({i: f"v{i}" for i in range(10)}), path))
    code = CHAIN_ON_THE_CALLING_THREAD.format(
        repo=str(Path(__file__).resolve().parents[1]), path=str(path)
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == repr([
        "v3v3", ["v1v1", "v0v0"],
        ["ValueError", "raised by transform scale", "while querying key 7 of TransformedDataset"],
        ["KeyError"], 1, "V2", True,
    ])


@pytest.mark.parametrize("kind", ["format 2", "format 1", "original"])
@pytest.mark.parametrize("mmap", [False, True])
def test_every_kind_of_file_reads_alike_on_the_calling_thread(
    tmp_path: Path, kind: str, mmap: bool
) -> None:
    # The blocking reads of each file format, with and without maps, cached or
    # not, give what the awaited reads give; a missing key is a KeyError either way.
    import numpy as np

    from mlworkflow_async import PickledDataset

    from ._pickled_util import assert_same, write_file, write_original_file

    items: dict[Any, Any] = {i: {"x": np.full(3, i), "i": i} for i in range(40)}
    items["big"] = np.arange(300_000, dtype=np.float64)  # mapped, not copied
    path = tmp_path / "f.pkl"
    if kind == "original":
        write_original_file(path, items)
    else:
        write_file(path, items, version=2 if kind == "format 2" else 1)
    keys = list(items)[::-1]
    with PickledDataset(path, mmap=mmap) as ds:
        awaited = asyncio.run(ds.query_items(keys))
        for inline in (True, False):
            ds._reader.inline = inline  # False: as if no page were cached
            for key, blocking, expected in zip(keys, ds.sync.query_items(keys), awaited,
                                               strict=True):
                assert_same(expected, blocking)
                assert_same(items[key], blocking)
            assert_same(items["big"], ds.sync.query_item("big"))
        with pytest.raises(KeyError, match="nope"):
            ds.sync.query_item("nope")


def test_keys_given_once_are_read_once_whichever_way_items_come() -> None:
    # A Subset checks its keys on the calling thread before its parent (filtered,
    # so read through the loop) is asked: keys given as an iterator must survive.
    from mlworkflow_async import FilteredDataset, Subset

    parent = FilteredDataset(DictDataset({i: -i for i in range(10)}), lambda key: key % 2 == 0)
    chain = Subset(parent, [0, 2, 4])
    assert chain.sync.query_items(iter([4, 0])) == [-4, 0]  # type: ignore[arg-type]
    assert DictDataset({1: "a"}).sync.query_items(iter([1])) == ["a"]  # type: ignore[arg-type]


def test_a_key_filter_over_a_file_is_judged_on_the_calling_thread(tmp_path: Path) -> None:
    from mlworkflow_async import FilteredDataset, PickledDataset, TransformedDataset

    path = tmp_path / "d.pkl"
    asyncio.run(PickledDataset.create(DictDataset({i: f"v{i}" for i in range(20)}), path))
    judged: list[tuple[int, threading.Thread]] = []

    def even(key: int) -> bool:
        judged.append((key, threading.current_thread()))
        if key == 31:  # not in the file: only a query judges it
            raise ValueError("unlucky")
        return key % 2 == 0

    with PickledDataset(path) as ds:
        kept = FilteredDataset(ds, even)
        assert kept.sync.query_items([4, 2]) == ["v4", "v2"]
        assert {thread for _, thread in judged} == {threading.current_thread()}
        with pytest.raises(KeyError, match="filters it out"):
            kept.sync.query_item(3)
        with pytest.raises(ValueError, match="unlucky") as info:
            kept.sync.query_item(31)
        assert any(note.startswith("raised by predicate") and note.endswith(".even")
                   for note in info.value.__notes__)
        with pytest.raises(KeyError, match="98 is not a key of the PickledDataset") as missing:
            kept.sync.query_item(98)  # kept by the predicate, but not in the file
        assert any("FilteredDataset" in note for note in missing.value.__notes__)
        # Keys vetted by discovery are not judged again.
        assert kept.sync.keys.all() == list(range(0, 20, 2))
        judged.clear()
        chain = TransformedDataset(kept, [lambda key, item: item.upper()])
        assert chain.sync.query_items([6, 8]) == ["V6", "V8"]
        assert judged == []
        # A pair predicate reads items through the loop, as everything else does.
        pairs = FilteredDataset(ds, lambda key, item: item.endswith("1"))
        assert pairs.sync.query_item(11) == "v11"
