"""The blocking SideRunner: same calls in plain code, the seed's examples as real scripts."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlworkflow_async.exceptions import RunnerClosedError, SyncInLoopError
from mlworkflow_async.sync import SideRunner

from ._forking import refusal_in_forked_child

SCRIPTS = Path(__file__).parent / "scripts"


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def fail(message: str) -> None:
    raise ValueError(message)


def test_run_async_returns_futures_and_collect_runs_the_results() -> None:
    with SideRunner(3) as runner:
        futures = [runner.run_async(pow, i, 2) for i in range(10)]
        assert all(isinstance(f, cf.Future) for f in futures)
        assert runner.collect_runs() == [i * i for i in range(10)]
        assert futures[4].result() == 16
        assert runner.collect_runs() == []


def test_thread_runs_never_exceed_pool_size() -> None:
    lock = threading.Lock()
    now = peak = 0

    def work() -> None:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        time.sleep(0.002)
        with lock:
            now -= 1

    with SideRunner(3) as runner:
        for _ in range(30):
            runner.do(work)
        runner.collect_runs()
    assert 1 <= peak <= 3


def test_async_functions_run_on_the_background_loop() -> None:
    async def double(x: int) -> int:
        return 2 * x

    with SideRunner(2) as runner:
        assert runner.run_async(double, 21).result(timeout=5) == 42


def test_do_failure_is_raised_by_close() -> None:
    runner = SideRunner(2)
    runner.do(fail, "at close")
    with pytest.raises(ValueError, match="at close"):
        runner.close()
    runner.close()  # reported once
    with pytest.raises(RunnerClosedError, match="after close"):
        runner.do(print)
    with pytest.raises(RunnerClosedError):
        runner.collect_runs()


def test_collect_runs_reports_only_its_runs_and_do_failures_come_at_close() -> None:
    runner = SideRunner(1)
    runner.do(fail, "from do")
    runner.run_async(pow, 2, 3)
    assert runner.collect_runs() == [8]
    with pytest.raises(ValueError, match="from do"):
        runner.close()


def test_collect_runs_groups_failures_after_waiting_for_the_others() -> None:
    with SideRunner(2) as runner:
        runner.run_async(fail, "bad")
        ok = runner.run_async(pow, 2, 10)
        with pytest.raises(ExceptionGroup) as info:
            runner.collect_runs()
        assert ok.result() == 1024
        assert [str(e) for e in info.value.exceptions] == ["bad"]
        runner.run_async(fail, "again")
        [exc] = runner.collect_runs(return_exceptions=True)
        assert isinstance(exc, ValueError)


def test_a_failure_read_from_its_future_is_not_raised_again() -> None:
    with SideRunner(1) as runner:
        future = runner.run_async(fail, "read")
        with pytest.raises(ValueError, match="read"):
            future.result(timeout=5)
    # the with block closed without raising it again


def test_a_failure_nobody_read_is_raised_at_close() -> None:
    with pytest.raises(ValueError, match="unread"), SideRunner(1) as runner:
        runner.run_async(fail, "unread")


def test_error_in_the_with_block_cancels_queued_work() -> None:
    started: list[int] = []
    futures: list[cf.Future[None]] = []
    submitted = threading.Event()

    def blocking(i: int) -> None:
        started.append(i)
        submitted.wait(5)
        # The first run holds the only slot until the queued runs are
        # cancelled, so none of them can have started by then.
        deadline = time.monotonic() + 5
        while not futures[-1].cancelled() and time.monotonic() < deadline:
            time.sleep(0.001)

    with pytest.raises(KeyError), SideRunner(1) as runner:
        futures.extend(runner.run_async(blocking, i) for i in range(5))
        submitted.set()
        deadline = time.monotonic() + 5
        while not started and time.monotonic() < deadline:
            time.sleep(0.001)
        raise KeyError("stop")
    assert started == [0]
    assert all(f.cancelled() for f in futures[1:])


def test_an_error_in_the_with_block_notes_the_runs_that_failed_meanwhile() -> None:
    # The block's error is what the async runner's block is left with.
    with pytest.raises(KeyError) as info, SideRunner(1) as runner:
        failing = runner.run_async(fail, "meanwhile")
        cf.wait([failing], timeout=5)  # done, but its outcome unread
        raise KeyError("body")
    assert any("meanwhile" in note for note in info.value.__notes__)


def test_a_dropped_runner_closes_once_its_work_is_over() -> None:
    gate = threading.Event()
    runner = SideRunner(1)
    future = runner.run_async(gate.wait, 5)
    core = runner._core
    del runner
    gc.collect()
    assert core.closed
    assert core.exited is None  # its work is still going
    gate.set()
    assert future.result(timeout=5) is True
    deadline = time.monotonic() + 10
    while (core.exited is None or not core.exited.done()) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert core.exited is not None
    assert core.exited.done()


def test_cancelling_a_future_before_it_starts() -> None:
    gate = threading.Event()
    ran: list[str] = []
    with SideRunner(1) as runner:
        runner.run_async(gate.wait, 5)
        later = runner.run_async(ran.append, "later")
        assert later.cancel()
        gate.set()
        results = runner.collect_runs(return_exceptions=True)
    assert ran == []
    assert results[0] is True
    assert isinstance(results[1], cf.CancelledError)


def test_yield_async_is_a_plain_iterator() -> None:
    closed = threading.Event()

    def numbers() -> object:
        try:
            yield from range(100)
        finally:
            closed.set()

    def broken() -> object:
        yield "ok"
        raise OSError("source failed")

    with SideRunner() as runner:
        assert list(runner.yield_async(range(4))) == [0, 1, 2, 3]
        stream = runner.yield_async(numbers(), in_advance=2)
        assert next(stream) == 0
        stream.close()
        assert closed.is_set()
        got = []
        with pytest.raises(OSError, match="source failed"):
            for item in runner.yield_async(broken()):
                got.append(item)
        assert got == ["ok"]


def test_breaking_out_of_yield_async_stops_the_producer() -> None:
    closed = threading.Event()

    def numbers() -> object:
        try:
            yield from range(1000)
        finally:
            closed.set()

    with SideRunner() as runner:
        for x in runner.yield_async(numbers()):
            if x == 2:
                break
        gc.collect()
        assert closed.wait(5)


async def test_inside_an_event_loop_it_refuses_and_points_to_the_async_runner() -> None:
    with pytest.raises(SyncInLoopError, match=r"async with mlworkflow_async\.SideRunner"):
        SideRunner(2)


def test_methods_refuse_inside_an_event_loop_too() -> None:
    with SideRunner(1) as runner:

        async def misuse() -> None:
            with pytest.raises(SyncInLoopError, match="collect_runs"):
                runner.collect_runs()
            with pytest.raises(SyncInLoopError):
                runner.run_async(print)

        asyncio.run(misuse())


# -- real scripts ---------------------------------------------------------


def test_seed_example_batch_generator_script() -> None:
    done = run_script("seed_batch_prefetch.py")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "batch [0, 1, 2, 3] [0, 1, 4, 9]",
        "batch [4, 5, 6, 7] [16, 25, 36, 49]",
        "batch [0, 1, 2] [0, 1, 4]",
        "batch [3, 4, 5] [9, 16, 25]",
        "batch [6, 7, 8] [36, 49, 64]",
        "generator ran in the main thread: [False]",
    ]


def test_seed_example_parallel_downloader_script(tmp_path: Path) -> None:
    served, out = tmp_path / "served", tmp_path / "out"
    served.mkdir()
    out.mkdir()
    for i in range(40):
        (served / f"item{i:02}.bin").write_bytes(os.urandom(100 + 37 * i))
    done = run_script("seed_parallel_downloader.py", str(served), str(out))
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[:2] == ["downloaded", "40"]
    assert 1 <= int(words[3]) <= 10
    for path in served.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_an_unclosed_runner_finishes_its_work_at_exit_and_reports_failures() -> None:
    done = run_script("unclosed_runner.py")
    assert done.returncode == 0, done.stderr
    # The dropped runner's line may come before or after the script's last one.
    lines = [line for line in done.stdout.splitlines() if line != "end of script"]
    assert done.stdout.splitlines().count("end of script") == 1
    assert sorted(lines) == [
        "done 0",
        "done 1",
        "done 2",
        "done 3",
        "done 4",
        "done 5",
        "dropped runner's work ran",
    ]
    assert "ValueError: failure nobody collected" in done.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ctrl_c_cancels_running_and_queued_work(mode: str) -> None:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "ctrl_c_runner.py"), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen: list[str] = []
        while "waiting" not in seen or sum(s.startswith("start") for s in seen) < 2:
            line = process.stdout.readline()
            assert line, f"script ended early: {seen}"
            seen.append(line.strip())
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert sorted(s for s in seen if s.startswith("start")) == ["start 0", "start 1"]
    assert out == ""  # no other call started, and none ran to its end
    assert process.returncode != 0
    assert "KeyboardInterrupt" in err


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_runner_inherited_by_a_forked_child_refuses_clearly(tmp_path: Path) -> None:
    with SideRunner(1) as runner:
        message = refusal_in_forked_child(
            tmp_path, lambda: runner.run_async(abs, -1), runner.close, RunnerClosedError
        )
        assert runner.run_async(abs, -2).result(timeout=5) == 2  # the parent's is fine
    assert "child process" in message
