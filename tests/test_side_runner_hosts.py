"""Where the runner and the blocking views run: asyncio only, notebooks, opted-in hosts."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import warnings

import anyio
import pytest

from mlworkflow_async import DictDataset, SideRunner
from mlworkflow_async import sync as blocking
from mlworkflow_async._core._portal import ENV_ALLOW, get_portal, in_ipython_kernel
from mlworkflow_async.exceptions import SyncInLoopError, UnsupportedBackendError

# -- trio -------------------------------------------------------------------


def test_under_trio_the_runner_refuses_at_once_and_leaves_nothing_behind() -> None:
    async def main() -> None:
        async with SideRunner(2) as runner:
            runner.run_async(anyio.sleep, 0)
            await runner.collect_runs()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedBackendError, match=r"needs asyncio.*under trio"):
            anyio.run(main, backend="trio")
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_under_trio_the_blocking_views_refuse_rather_than_freeze_its_loop() -> None:
    async def main() -> None:
        with pytest.raises(SyncInLoopError, match="running trio event loop"):
            DictDataset({1: "a"}).sync.query_item(1)
        with pytest.raises(SyncInLoopError, match="trio"):
            blocking.SideRunner(1)

    anyio.run(main, backend="trio")


# -- blocking inside a running loop ----------------------------------------


async def test_refused_in_a_running_loop_with_a_hint_at_the_opt_in() -> None:
    with pytest.raises(SyncInLoopError, match=r"allow_blocking_in_loop\(\)"):
        DictDataset({1: "a"}).sync.query_item(1)


async def test_allowed_in_a_running_loop_once_opted_in() -> None:
    # This test's thread runs an event loop, as a notebook kernel's does.
    blocking.allow_blocking_in_loop()
    try:
        assert DictDataset({1: "a"}).sync.query_item(1) == "a"
        with blocking.SideRunner(2) as runner:
            for i in range(4):
                runner.run_async(pow, i, 2)
            assert runner.collect_runs() == [0, 1, 4, 9]
            assert list(runner.yield_async(range(3))) == [0, 1, 2]
    finally:
        blocking.allow_blocking_in_loop(None)
    with pytest.raises(SyncInLoopError):
        DictDataset({1: "a"}).sync.query_item(1)


async def test_the_environment_variable_opts_in_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_ALLOW, "1")
    assert DictDataset({1: "a"}).sync.query_items([1]) == ["a"]
    blocking.allow_blocking_in_loop(False)  # the call wins over the environment
    try:
        with pytest.raises(SyncInLoopError):
            DictDataset({1: "a"}).sync.query_items([1])
    finally:
        blocking.allow_blocking_in_loop(None)
    monkeypatch.setenv(ENV_ALLOW, "0")
    with pytest.raises(SyncInLoopError):
        DictDataset({1: "a"}).sync.query_items([1])


def test_never_on_the_background_loop_itself() -> None:
    async def blocks_on_itself() -> None:
        DictDataset({1: "a"}).sync.query_item(1)

    blocking.allow_blocking_in_loop()
    try:
        with pytest.raises(SyncInLoopError, match="wait on itself"):
            get_portal().call(blocks_on_itself)
    finally:
        blocking.allow_blocking_in_loop(None)


# -- IPython ----------------------------------------------------------------


def test_kernel_detection_neither_imports_ipython_nor_takes_a_terminal_shell() -> None:
    code = textwrap.dedent(
        """
        import sys
        from mlworkflow_async._core._portal import in_ipython_kernel
        assert not in_ipython_kernel()
        assert "IPython" not in sys.modules
        from IPython.terminal.interactiveshell import TerminalInteractiveShell
        TerminalInteractiveShell.instance()
        import IPython
        assert IPython.get_ipython() is not None
        assert not in_ipython_kernel()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr
    assert not in_ipython_kernel()  # pytest's process is no kernel either


def test_blocking_views_work_in_a_real_jupyter_kernel() -> None:
    manager = pytest.importorskip("jupyter_client.manager")
    cell = textwrap.dedent(
        """
        import asyncio
        asyncio.get_running_loop()  # the kernel's loop runs this cell
        from mlworkflow_async import DictDataset
        from mlworkflow_async.sync import SideRunner, allow_blocking_in_loop

        print(DictDataset({1: "a"}).sync.query_item(1))
        with SideRunner(2) as runner:
            runner.run_async(pow, 2, 5)
            print(runner.collect_runs())
        allow_blocking_in_loop(False)  # an explicit refusal wins
        try:
            DictDataset({1: "a"}).sync.query_item(1)
        except Exception as exc:
            print(type(exc).__name__)
        """
    )
    km, kc = manager.start_new_kernel(kernel_name="python3")
    try:
        out: list[str] = []

        def collect(msg: dict[str, object]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out.append(content["text"])  # type: ignore[index]
            elif msg["msg_type"] == "error":
                out.append("\n".join(content["traceback"]))  # type: ignore[index]

        reply = kc.execute_interactive(cell, timeout=60, output_hook=collect)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok", out
    assert "".join(out).split() == ["a", "[32]", "SyncInLoopError"]
