"""The plain training script example, run end to end."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import mlworkflow_async.sync as blocking
from examples import train_loop

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_loop.py"
EPOCH = re.compile(r"epoch (\d+)/(\d+): mean loss ([\d.]+) over (\d+) batches")
FINAL = re.compile(r"final accuracy on all (\d+) items: ([\d.]+)%")


def results(output: str) -> tuple[list[float], float]:
    losses = [float(m.group(3)) for m in EPOCH.finditer(output)]
    final = FINAL.search(output)
    assert final is not None, output
    return losses, float(final.group(2)) / 100


def test_loss_falls_and_accuracy_is_well_above_chance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.pickle"
    argv = ["--data", str(data), "--items", "2048", "--batch-size", "32"]
    assert train_loop.main(argv) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"cached 2048 items in {data}")
    assert len(EPOCH.findall(output)) == 2
    assert [m[3] for m in EPOCH.findall(output)] == ["64", "64"]
    losses, accuracy = results(output)
    assert losses[1] < losses[0] < 0.6931  # below the loss of a coin flip, and falling
    assert accuracy > 0.85

    # The cache is a real PickledDataset file, reused by the next run.
    with blocking.PickledDataset(data) as ds:
        assert len(ds) == 2048
        item = ds.sync.query_item(5)
        assert item["x"].shape == (20,)
        assert item["y"] in (0.0, 1.0)
    assert train_loop.main(argv) == 0
    again = capsys.readouterr().out
    assert again.startswith(f"using cached data in {data}")
    assert results(again) == (losses, accuracy)  # deterministic from the seed


def test_train_returns_the_history(tmp_path: Path) -> None:
    data = tmp_path / "train.pickle"
    train_loop.prepare(data, items=1024, features=8, separation=4.0, seed=3)
    lines: list[str] = []
    with blocking.PickledDataset(data) as ds:
        losses, accuracy = train_loop.train(
            ds, epochs=3, batch_size=16, learning_rate=0.2, seed=1, report=lines.append
        )
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    assert accuracy > 0.9
    assert lines[-1] == f"final accuracy on all 1024 items: {accuracy:.1%}"


def test_runs_as_a_plain_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", "data.pickle", "--items", "1024"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    losses, accuracy = results(result.stdout)
    assert len(losses) == 2
    assert losses[1] < losses[0]
    assert accuracy > 0.85
    assert (tmp_path / "data.pickle").is_file()


def test_the_script_has_no_async_code() -> None:
    tokens = tokenize.generate_tokens(io.StringIO(SCRIPT.read_text()).readline)
    keywords = {tok.string for tok in tokens if tok.type == tokenize.NAME}
    assert not keywords & {"async", "await"}
