"""The remote training example, run end to end on loopback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from examples import remote_training

EPOCH = re.compile(r"epoch (\d+)/(\d+): mean loss ([\d.]+), [\d,]+ items/s, (\d+) requests")


def test_training_from_a_served_folder_with_a_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--folder", str(tmp_path / "served"), "--cache", str(tmp_path / "cache"),
            "--items", "2048", "--epochs", "3"]
    assert remote_training.main(argv) == 0
    output = capsys.readouterr().out
    epochs = EPOCH.findall(output)
    assert len(epochs) == 3
    assert int(epochs[0][3]) > 0
    assert [int(e[3]) for e in epochs[1:]] == [0, 0]  # later epochs come from the cache
    losses = [float(e[2]) for e in epochs]
    assert losses[-1] < losses[0]
    accuracy = re.search(r"final accuracy on all 2048 items: ([\d.]+)%", output)
    assert accuracy is not None
    assert float(accuracy[1]) > 90
    assert list((tmp_path / "cache").glob("*.ranges"))
