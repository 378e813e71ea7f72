"""The demo, the README's first command, runs and reports what it did."""

from __future__ import annotations

import pytest

from mlworkflow_async.__main__ import main


def test_demo_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--items", "400"]) == 0
    out = capsys.readouterr().out
    assert "400 generated sensor readings" in out
    assert "350 items" in out  # one sensor in eight filtered out by key
    assert "wrote 350 items" in out
    assert "same data as the async stream: True" in out
