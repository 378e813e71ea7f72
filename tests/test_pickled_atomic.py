"""PickledDataset.create is all or nothing: errors, cancellation, Ctrl-C and kills."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mlworkflow_async import CorruptFileError, DictDataset, PickledDataset

from ._pickled_util import Gated, leftovers
from .conftest import wait_until

REPO = str(Path(__file__).resolve().parents[1])
PREVIOUS = {"old": np.arange(10), "kept": "yes"}


async def write_previous(path: Path) -> None:
    await PickledDataset.create(DictDataset(PREVIOUS), path)


async def read_previous(path: Path) -> None:
    async with await PickledDataset.open(path) as ds:
        old, kept = await ds.query_items(["old", "kept"])
        np.testing.assert_array_equal(old, PREVIOUS["old"])
        assert kept == "yes"
        assert len(ds) == 2


def temporary_size(folder: Path) -> int:
    names = leftovers(str(folder))
    return os.path.getsize(folder / names[0]) if names else 0


async def test_cancelled_create_leaves_no_file(tmp_path: Path) -> None:
    source = Gated(2000, gate_at=1000)
    path = tmp_path / "new.pkl"
    task = asyncio.create_task(PickledDataset.create(source, path))
    await wait_until(lambda: source.reached is not None and source.reached.is_set())
    await wait_until(lambda: temporary_size(tmp_path) > 10_000)  # data was written
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not path.exists()
    assert leftovers(str(tmp_path)) == []


async def test_cancelled_create_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    await write_previous(path)
    source = Gated(2000, gate_at=700)
    task = asyncio.create_task(PickledDataset.create(source, path))
    await wait_until(lambda: source.reached is not None and source.reached.is_set())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await read_previous(path)
    assert leftovers(str(tmp_path)) == []


async def test_error_mid_create_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    await write_previous(path)
    with pytest.raises(RuntimeError, match="source failed at 1500"):
        await PickledDataset.create(Gated(2000, fail_at=1500), path, concurrency=100)
    await read_previous(path)
    assert leftovers(str(tmp_path)) == []


async def test_finished_create_replaces_the_file_with_umask_permissions(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    await write_previous(path)
    assert await PickledDataset.create(Gated(300), path) == 300
    async with await PickledDataset.open(path) as ds:
        assert len(ds) == 300
        assert ds.context == {"made_by": "Gated"}
        item = await ds.query_item(299)
        assert item["i"] == 299
        assert item["x"][0] == 299
    umask = _current_umask()
    if umask is not None:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _current_umask() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return None


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from mlworkflow_async import PickledDataset
    from tests._pickled_util import Gated

    async def main():
        source = Gated(5000, gate_at=2000)

        async def announce():
            while source.reached is None or not source.reached.is_set():
                await asyncio.sleep(0.001)
            print("midway", flush=True)

        asyncio.ensure_future(announce())
        if {to_file_object!r}:
            with open({path!r}, "wb") as f:
                await PickledDataset.create(source, f)
        else:
            await PickledDataset.create(source, {path!r})

    asyncio.run(main())
    """
)


def start_writer(path: Path, to_file_object: bool = False) -> subprocess.Popen[str]:
    code = CHILD.format(repo=REPO, path=str(path), to_file_object=to_file_object)
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != "midway":
        child.kill()
        raise AssertionError(f"writer did not start: {line!r} {child.communicate()}")
    return child


def test_ctrl_c_keeps_the_previous_file_and_removes_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    asyncio.run(write_previous(path))
    child = start_writer(path)
    assert leftovers(str(tmp_path))  # the new file is being written beside the old one
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert child.returncode != 0
    assert "KeyboardInterrupt" in err
    asyncio.run(read_previous(path))
    assert leftovers(str(tmp_path)) == []


def test_killed_writer_leaves_the_previous_file_readable(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    asyncio.run(write_previous(path))
    child = start_writer(path)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    asyncio.run(read_previous(path))
    # The killed writer could not clean up; its partial file is recognised as such.
    (partial,) = leftovers(str(tmp_path))
    with pytest.raises(CorruptFileError, match="end-of-file marker is missing"):
        PickledDataset(tmp_path / partial)


def test_a_killed_writers_leftover_is_as_documented_and_safe_to_delete(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    asyncio.run(write_previous(path))
    child = start_writer(path)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    (partial,) = leftovers(str(tmp_path))
    assert re.fullmatch(r"\.data\.pkl\.[0-9a-f]{8}\.tmp", partial)
    # What the docs say of it: its name pattern, and that it may be deleted.
    readme = (Path(REPO) / "README.md").read_text()
    store = readme[readme.index("## PickledDataset: one packed file"):]
    store = store[:store.index("\n## ", 1)]
    docs = " ".join((PickledDataset.create.__doc__ or "").split())
    for text in (" ".join(store.split()), docs):
        assert ".NAME.XXXXXXXX.tmp" in text
        assert "SIGKILL" in text
        assert "safe to delete" in text
    (tmp_path / partial).unlink()
    asyncio.run(read_previous(path))
    asyncio.run(PickledDataset.create(DictDataset({"new": 1}), path))
    with PickledDataset(path) as ds:
        assert ds.sync.query_item("new") == 1
    assert leftovers(str(tmp_path)) == []


def test_killed_writer_of_a_file_object_leaves_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "direct.pkl"
    child = start_writer(path, to_file_object=True)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert path.stat().st_size > 0
    with pytest.raises(CorruptFileError, match=r"direct\.pkl"):
        PickledDataset(path)


async def test_create_into_a_directory_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "some_dir"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match="some_dir: it is a directory") as info:
        await PickledDataset.create(DictDataset(PREVIOUS), target)
    assert info.value.filename == str(target)
    assert leftovers(str(tmp_path)) == []
    assert list(target.iterdir()) == []


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs); mounting one needs root."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (see the RLIMIT_FSIZE test)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


async def test_disk_full_names_the_file_and_leaves_nothing(tiny_filesystem: Path) -> None:
    path = tiny_filesystem / "data.pkl"
    await write_previous(path)
    big = DictDataset({i: np.full(100_000, i, dtype=np.int64) for i in range(4)})  # 3.2 MB
    with pytest.raises(OSError, match=r"cannot write .*tiny/data\.pkl: No space left") as info:
        await PickledDataset.create(big, path)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(path)
    await read_previous(path)
    assert leftovers(str(tiny_filesystem)) == []


FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import asyncio, resource, signal, sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from mlworkflow_async import DictDataset, PickledDataset

    # Past the limit a write fails with EFBIG, as a full disk fails with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    big = DictDataset({{i: np.full(100_000, i, dtype=np.int64) for i in range(4)}})
    try:
        asyncio.run(PickledDataset.create(big, {path!r}))
    except OSError as exc:
        print(exc.errno, exc.filename, exc, sep="\\n")
    """
)


def test_failed_write_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    # Works without root: the file size limit makes the write itself fail.
    path = tmp_path / "data.pkl"
    code = FILE_SIZE_LIMIT.format(repo=REPO, path=str(path))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)
    number, filename, message = child.stdout.splitlines()
    assert int(number) == errno.EFBIG
    assert filename == str(path)
    assert message.startswith(f"[Errno {errno.EFBIG}] cannot write {path}: File too large")
    assert not path.exists()
    assert leftovers(str(tmp_path)) == []


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """No file can be created in ``folder`` (root ignores modes: make it immutable)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root, and chattr +i is not available to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


async def test_read_only_folder_names_the_target_file(tmp_path: Path) -> None:
    folder = tmp_path / "read_only"
    folder.mkdir()
    path = folder / "data.pkl"
    with read_only(folder), pytest.raises(PermissionError) as info:
        await PickledDataset.create(DictDataset({"a": 1}), path)
    assert info.value.filename == str(path)
    assert f"cannot write {path}: no permission to create files in its folder" in str(info.value)
    assert ".tmp" not in str(info.value)
    assert leftovers(str(folder)) == []


class _HeldParts(list):  # type: ignore[type-arg]
    """Buffers whose slicing waits for ``release``: a write stays in flight."""

    def __init__(self, items: list[bytes], entered: threading.Event, release: threading.Event):
        super().__init__(items)
        self.entered, self.release = entered, release

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.release.wait(10)
        return list.__getitem__(self, index)


def test_discard_waits_for_a_running_write_so_no_other_file_gets_its_bytes(tmp_path):
    # A cancelled create discards its file while the worker thread may still
    # write: closing the descriptor then would send those bytes to whichever
    # file reuses the descriptor number.
    from mlworkflow_async._store._writes import AtomicFile

    sink = AtomicFile(str(tmp_path / "out.pkl"))
    entered, release = threading.Event(), threading.Event()
    writer = threading.Thread(
        target=lambda: sink.write(_HeldParts([b"leaked!"], entered, release))
    )
    writer.start()
    assert entered.wait(10)
    discarder = threading.Thread(target=sink.discard)
    discarder.start()
    discarder.join(0.5)  # without the lock, discard closes the descriptor here
    victim = tmp_path / "victim"
    fd = os.open(victim, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        release.set()
        writer.join(10)
        discarder.join(10)
        assert not writer.is_alive()
        assert not discarder.is_alive()
    finally:
        os.close(fd)
    assert victim.read_bytes() == b""
    assert not (tmp_path / "out.pkl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["victim"]
    with pytest.raises(ValueError, match=r"out\.pkl"):
        sink.write([b"late"])
