"""The async SideRunner: bounded runs, results, errors, prefetching, cancellation."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import signal
import threading
import time

import anyio
import anyio.from_thread
import pytest

import mlworkflow_async
from mlworkflow_async import Prefetcher, RunHandle, SideRunner
from mlworkflow_async.exceptions import RunnerClosedError

from .conftest import wait_until


class Gauge:
    """Counts runs going at once, from the loop and from threads alike."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.finished = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1
            self.finished += 1


# -- results and bounds ---------------------------------------------------


async def test_results_come_in_submission_order() -> None:
    async def late_first(i: int, n: int) -> int:
        for _ in range(n - i):  # earlier submissions finish later
            await asyncio.sleep(0)
        return i * 10

    async with SideRunner(8) as runner:
        handles = [runner.run_async(late_first, i, 8) for i in range(8)]
        assert await runner.collect_runs() == [i * 10 for i in range(8)]
        assert await handles[3] == 30
        assert await runner.collect_runs() == []  # the pending list was cleared


async def test_async_runs_never_exceed_pool_size() -> None:
    gauge = Gauge()

    async def work() -> None:
        gauge.enter()
        for _ in range(3):
            await asyncio.sleep(0)
        gauge.leave()

    async with SideRunner(4) as runner:
        for _ in range(50):
            runner.do(work)
    assert gauge.finished == 50
    assert gauge.peak == 4


async def test_thread_runs_never_exceed_pool_size() -> None:
    gauge = Gauge()
    together = threading.Barrier(3, timeout=5)  # proves 3 do run at once
    loop_threads: set[bool] = set()

    def work(i: int) -> int:
        loop_threads.add(threading.current_thread() is threading.main_thread())
        gauge.enter()
        together.wait()
        gauge.leave()
        return i

    async with SideRunner(3) as runner:
        for i in range(12):
            runner.run_async(work, i)
        assert await runner.collect_runs() == list(range(12))
    assert gauge.peak == 3
    assert loop_threads == {False}


async def test_mixed_async_and_thread_runs_share_the_bound() -> None:
    gauge = Gauge()

    async def on_loop() -> None:
        gauge.enter()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gauge.leave()

    def in_thread() -> None:
        gauge.enter()
        time.sleep(0.001)
        gauge.leave()

    async with SideRunner(2) as runner:
        for _ in range(20):
            runner.do(on_loop)
            runner.do(in_thread)
    assert gauge.finished == 40
    assert gauge.peak <= 2


async def test_queued_calls_are_not_tasks() -> None:
    async def ident(i: int) -> int:
        return i

    before = len(asyncio.all_tasks())
    async with SideRunner(10) as runner:
        for i in range(100_000):
            runner.run_async(ident, i)
        assert len(asyncio.all_tasks()) <= before + 10
        results = await runner.collect_runs()
    assert results == list(range(100_000))
    handle = RunHandle(ident, (1,), None, False, None)
    assert not hasattr(handle, "__dict__")


async def test_keyword_arguments_and_handles() -> None:
    def scale(x: int, *, by: int) -> int:
        return x * by

    async with SideRunner(2) as runner:
        handle = runner.run_async(scale, 3, by=4)
        assert await handle == 12
        assert handle.done()
        assert handle.result() == 12
        assert "done" in repr(handle)


# -- errors ---------------------------------------------------------------


async def fail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


async def test_do_failure_is_raised_when_leaving() -> None:
    with pytest.raises(ValueError, match=r"lost\?") as info:
        async with SideRunner(2) as runner:
            runner.do(fail, "lost?")
    assert any("fail('lost?')" in note for note in info.value.__notes__)


async def test_several_do_failures_are_grouped() -> None:
    with pytest.raises(ExceptionGroup) as info:
        async with SideRunner(2) as runner:
            runner.do(fail, "one")
            runner.do(fail, "two")
    assert sorted(str(e) for e in info.value.exceptions) == ["one", "two"]


async def test_collect_runs_waits_for_the_others_then_raises_the_failures() -> None:
    finished: list[int] = []

    async def ok(i: int) -> int:
        for _ in range(5):
            await asyncio.sleep(0)
        finished.append(i)
        return i

    async with SideRunner(4) as runner:
        runner.run_async(fail, "early")
        for i in range(3):
            runner.run_async(ok, i)
        with pytest.raises(ExceptionGroup) as info:
            await runner.collect_runs()
        assert sorted(finished) == [0, 1, 2]
        assert [str(e) for e in info.value.exceptions] == ["early"]
        assert "1 of 4 runs failed" in str(info.value)

        runner.run_async(ok, 7)
        runner.run_async(fail, "kept")
        results = await runner.collect_runs(return_exceptions=True)
        assert results[0] == 7
        assert isinstance(results[1], ValueError)
        assert str(results[1]) == "kept"


async def test_collect_runs_reports_only_its_runs_and_do_failures_come_when_leaving() -> None:
    async def ok() -> str:
        return "ok"

    with pytest.raises(ValueError, match="from do"):
        async with SideRunner(1) as runner:
            runner.do(fail, "from do")
            runner.run_async(ok)
            assert await runner.collect_runs() == ["ok"]
            runner.run_async(fail, "collected")
            [exc] = await runner.collect_runs(return_exceptions=True)
            assert str(exc) == "collected"


async def test_uncollected_failure_is_raised_when_leaving_but_not_a_seen_one() -> None:
    with pytest.raises(ValueError, match="never looked at"):
        async with SideRunner(1) as runner:
            runner.run_async(fail, "never looked at")

    async with SideRunner(1) as runner:
        handle = runner.run_async(fail, "seen")
        with pytest.raises(ValueError, match="seen"):
            await handle


async def test_thread_failure_keeps_its_type() -> None:
    def parse(text: str) -> int:
        return int(text)

    async with SideRunner(1) as runner:
        handle = runner.run_async(parse, "x1")
        with pytest.raises(ValueError, match="invalid literal") as info:
            await handle
    assert any("parse('x1')" in note for note in info.value.__notes__)


async def test_body_error_cancels_work_and_propagates_with_a_note() -> None:
    started: list[int] = []
    blocker = asyncio.Event()

    async def wait_forever(i: int) -> None:
        started.append(i)
        await blocker.wait()

    with pytest.raises(KeyError) as info:
        async with SideRunner(1) as runner:
            runner.do(fail, "meanwhile")
            runner.do(wait_forever, 1)
            runner.do(wait_forever, 2)
            await wait_until(lambda: started == [1])
            raise KeyError("body")
    assert started == [1]
    assert any("meanwhile" in note for note in info.value.__notes__)


# -- lifecycle ------------------------------------------------------------


async def test_leaving_waits_for_runs_still_going() -> None:
    done: list[str] = []

    async def slow_async() -> None:
        for _ in range(20):
            await asyncio.sleep(0)
        done.append("async")

    def slow_thread() -> None:
        time.sleep(0.02)
        done.append("thread")

    async with SideRunner(2) as runner:
        runner.do(slow_async)
        runner.do(slow_thread)
        runner.do(slow_async)
    assert sorted(done) == ["async", "async", "thread"]


async def test_using_the_runner_outside_its_block_is_a_clear_error() -> None:
    runner = SideRunner(2)
    with pytest.raises(RunnerClosedError, match="async with SideRunner"):
        runner.do(print)
    with pytest.raises(RunnerClosedError):
        runner.run_async(print)
    with pytest.raises(RunnerClosedError):
        await runner.collect_runs()
    with pytest.raises(RunnerClosedError):
        runner.yield_async([1])
    async with runner:
        with pytest.raises(RuntimeError, match="already open"):
            await runner.__aenter__()
        with pytest.raises(TypeError, match="needs a function"):
            runner.do(42)  # type: ignore[arg-type]
    with pytest.raises(RunnerClosedError):
        runner.run_async(print)


async def test_calls_from_another_thread_point_to_the_blocking_runner() -> None:
    async with SideRunner(1) as runner:

        def from_thread() -> None:
            runner.do(print)

        with pytest.raises(RuntimeError, match=r"mlworkflow_async\.sync\.SideRunner"):
            await anyio.to_thread.run_sync(from_thread)


def test_a_runner_is_not_bound_to_one_event_loop() -> None:
    runner = SideRunner(2)

    async def use(n: int) -> list[int]:
        async with runner:
            for i in range(n):
                runner.run_async(abs, -i)
            return await runner.collect_runs()

    assert asyncio.run(use(3)) == [0, 1, 2]
    assert asyncio.run(use(2)) == [0, 1]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        SideRunner(0)
    with pytest.raises(TypeError, match="executor"):
        SideRunner(1, executor=object())


async def test_cancelling_a_queued_run() -> None:
    gate = asyncio.Event()
    ran: list[str] = []

    async def first() -> None:
        await gate.wait()
        ran.append("first")

    def second() -> None:
        ran.append("second")

    async with SideRunner(1) as runner:
        runner.run_async(first)
        handle = runner.run_async(second)
        assert handle.cancel()
        assert handle.cancelled()
        gate.set()
        results = await runner.collect_runs(return_exceptions=True)
    assert ran == ["first"]
    assert isinstance(results[1], cf.CancelledError)
    with pytest.raises(cf.CancelledError):
        handle.result()


# -- cancellation ---------------------------------------------------------


async def test_cancelling_the_enclosing_scope_stops_running_and_queued_work() -> None:
    started: list[str] = []
    cleaned: list[str] = []
    in_thread_stopped = threading.Event()

    async def on_loop(name: str) -> None:
        started.append(name)
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(name)

    def in_thread(name: str) -> None:
        started.append(name)
        for _ in range(5000):  # gives up long before this, when cancelled
            try:
                anyio.from_thread.check_cancelled()
            except BaseException:
                in_thread_stopped.set()
                raise
            time.sleep(0.001)

    with anyio.move_on_after(30) as scope:
        async with SideRunner(2) as runner:
            runner.do(on_loop, "a")
            runner.do(in_thread, "t")
            for i in range(5):
                runner.do(on_loop, f"queued {i}")
            await wait_until(lambda: len(started) == 2)
            scope.cancel()
            await asyncio.sleep(0)
    assert scope.cancelled_caught
    assert sorted(started) == ["a", "t"]
    assert cleaned == ["a"]
    assert in_thread_stopped.is_set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert sorted(started) == ["a", "t"]  # queued work never starts


async def test_cancelling_the_task_that_waits_on_exit() -> None:
    started: list[int] = []
    release = threading.Event()

    def blocking(i: int) -> None:
        started.append(i)
        release.wait(5)

    async def body() -> None:
        async with SideRunner(1) as runner:
            for i in range(4):
                runner.do(blocking, i)

    task = asyncio.create_task(body())
    await wait_until(lambda: started == [0])
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # a thread cannot be interrupted: waits for it
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert started == [0]


async def test_a_signal_caught_by_a_worker_thread_wakes_the_sleeping_loop() -> None:
    # The operating system may hand Ctrl-C to any thread; Python runs the
    # handler in the main thread, which sleeps in the loop meanwhile.
    handled = threading.Event()

    def in_thread() -> bool:
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # caught here
        return handled.wait(10)  # set only if the main thread woke to run the handler

    previous = signal.signal(signal.SIGUSR1, lambda *_: handled.set())
    try:
        async with SideRunner(1) as runner:
            assert await runner.run_async(in_thread)
    finally:
        signal.signal(signal.SIGUSR1, previous)


# -- yield_async ----------------------------------------------------------


async def test_yield_async_sync_generator_runs_in_a_thread() -> None:
    threads: set[bool] = set()

    def numbers() -> object:
        for i in range(5):
            threads.add(threading.current_thread() is threading.main_thread())
            yield i

    async with SideRunner() as runner:
        assert [x async for x in runner.yield_async(numbers())] == [0, 1, 2, 3, 4]
    assert threads == {False}


async def test_yield_async_accepts_iterables_async_generators_and_factories() -> None:
    async def agen() -> object:
        for c in "ab":
            await asyncio.sleep(0)
            yield c

    def factory() -> object:
        yield from (1, 2)

    async with SideRunner() as runner:
        assert [x async for x in runner.yield_async([3, 4])] == [3, 4]
        assert [x async for x in runner.yield_async(agen())] == ["a", "b"]
        assert [x async for x in runner.yield_async(agen)] == ["a", "b"]
        assert [x async for x in runner.yield_async(factory)] == [1, 2]
        assert [x async for x in runner.yield_async(lambda: range(2))] == [0, 1]

        def batch_generator(dataset: object, keys: object, batch_size: int) -> object:
            yield from ()

        with pytest.raises(TypeError, match=r"needs 3 argument.*batch_generator\(\.\.\.\)"):
            runner.yield_async(batch_generator)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="generator"):
            runner.yield_async(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="in_advance"):
            runner.yield_async([1], in_advance=-1)


async def test_yield_async_stays_at_most_in_advance_items_ahead() -> None:
    produced = 0

    def numbers() -> object:
        nonlocal produced
        for i in range(100):
            produced += 1
            yield i

    async with SideRunner() as runner:
        stream = runner.yield_async(numbers(), in_advance=3)
        await wait_until(lambda: produced == 3)
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert produced == 3
        assert await anext(stream) == 0
        assert await anext(stream) == 1
        await wait_until(lambda: produced == 5)
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert produced == 5
        await stream.aclose()


async def test_yield_async_errors_reach_the_consumer_in_order() -> None:
    def broken() -> object:
        yield 1
        yield 2
        raise OSError("disk gone")

    async def abroken() -> object:
        yield 1
        raise OSError("socket gone")

    async with SideRunner() as runner:
        got: list[int] = []
        with pytest.raises(OSError, match="disk gone") as info:
            async for x in runner.yield_async(broken(), in_advance=5):
                got.append(x)
        assert got == [1, 2]
        assert any("yield_async" in note for note in info.value.__notes__)
        got = []
        with pytest.raises(OSError, match="socket gone"):
            async for x in runner.yield_async(abroken()):
                got.append(x)
        assert got == [1]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_breaking_out_stops_the_producer(kind: str) -> None:
    produced = 0
    closed = asyncio.Event() if kind == "async" else threading.Event()

    def numbers() -> object:
        nonlocal produced
        try:
            for i in range(1000):
                produced += 1
                yield i
        finally:
            closed.set()

    async def anumbers() -> object:
        nonlocal produced
        try:
            for i in range(1000):
                produced += 1
                await asyncio.sleep(0)
                yield i
        finally:
            closed.set()

    async with SideRunner() as runner:
        source = numbers() if kind == "sync" else anumbers()
        async for x in runner.yield_async(source, in_advance=2):
            if x == 4:
                break
        await wait_until(closed.is_set)
        assert produced <= 5 + 2


async def test_aclose_and_async_with_close_the_source() -> None:
    closed: list[str] = []

    def numbers(tag: str) -> object:
        try:
            yield from range(1000)
        finally:
            closed.append(tag)

    async with SideRunner() as runner:
        stream = runner.yield_async(numbers("aclose"))
        assert await anext(stream) == 0
        await stream.aclose()
        assert closed == ["aclose"]
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        async with runner.yield_async(numbers("with")) as stream:
            assert await anext(stream) == 0
        assert closed == ["aclose", "with"]


async def test_a_heavy_sync_generator_does_not_block_the_loop() -> None:
    go = threading.Event()
    ticks = 0

    def heavy() -> object:
        go.wait(5)  # stands for a slow batch
        yield "batch"

    async with SideRunner() as runner:
        stream = runner.yield_async(heavy())
        for _ in range(10):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 10
        go.set()
        assert [x async for x in stream] == ["batch"]


async def test_leaving_the_runner_stops_unfinished_producers() -> None:
    closed = threading.Event()

    def endless() -> object:
        try:
            while True:
                yield 1
        finally:
            closed.set()

    async with SideRunner() as runner:
        stream = runner.yield_async(endless())
        assert await anext(stream) == 1
    assert closed.is_set()
    with pytest.raises(RunnerClosedError, match="async with"):
        while True:
            await anext(stream)


async def test_a_coroutine_instead_of_a_function_gets_a_hint() -> None:
    async def fetch(x: int) -> int:
        return x

    async with SideRunner(1) as runner:
        with pytest.raises(TypeError, match=r"coroutine.*run_async\(.*fetch, arg"):
            runner.run_async(fetch(1))  # type: ignore[arg-type]


async def test_yield_async_with_nothing_in_advance_fetches_on_demand() -> None:
    produced = 0

    def numbers() -> object:
        nonlocal produced
        for i in range(10):
            produced += 1
            yield i

    async with SideRunner() as runner:
        stream = runner.yield_async(numbers(), in_advance=0)
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert produced == 0
        assert await anext(stream) == 0
        assert await anext(stream) == 1
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert produced == 2
        await stream.aclose()


async def test_returned_objects_are_public_and_say_so() -> None:
    assert {"RunHandle", "Prefetcher"} <= set(mlworkflow_async.__all__)

    def numbers() -> object:
        yield from range(3)

    async with SideRunner(1) as runner:
        handle = runner.run_async(abs, -1)
        stream = runner.yield_async(numbers(), in_advance=2)
        assert isinstance(handle, RunHandle)
        assert isinstance(stream, Prefetcher)
        assert await handle == 1
        assert await anext(stream) == 0
        await wait_until(lambda: "2 ready" in repr(stream))
        assert repr(stream).startswith("<Prefetcher of ")
        assert repr(stream).endswith(".numbers in_advance=2 2 ready>")
        assert [x async for x in stream] == [1, 2]
        assert repr(stream).endswith(".numbers in_advance=2 finished>")
    assert repr(handle) == "<RunHandle abs done>"
    for cls in (RunHandle, Prefetcher):
        assert cls.__module__ == "mlworkflow_async"
        assert "_runner" not in repr(cls)
