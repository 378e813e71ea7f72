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
from mlworkflow_async import DictDataset

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
        item = ds.query_item(5)
        assert item["x"].shape == (20,)
        assert item["y"] in (0.0, 1.0)
    assert train_loop.main(argv) == 0
    again = capsys.readouterr().out
    assert again.startswith(f"using cached data in {data}")
    assert results(again) == (losses, accuracy)  # deterministic from the seed


def test_a_cache_of_other_data_is_generated_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.pickle"
    base = ["--data", str(data), "--epochs", "1", "--batch-size", "16"]
    assert train_loop.main([*base, "--items", "400"]) == 0
    assert capsys.readouterr().out.startswith(f"cached 400 items in {data}")

    # Asking for 50 items rebuilds the cache, and says why.
    assert train_loop.main([*base, "--items", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"rebuilding {data}: it holds other data (items 400 -> 50)"
    assert lines[1].startswith(f"cached 50 items in {data}")
    final = FINAL.search(lines[-1])
    assert final is not None
    assert final.group(1) == "50"  # trained on the 50 items asked for
    with blocking.PickledDataset(data) as ds:
        assert len(ds) == 50
        assert ds.context == {
            "generated_with": {"items": 50, "features": 20, "separation": 3.0, "seed": 0}
        }

    # The same settings reuse it; any other setting that shapes the data does not.
    assert train_loop.main([*base, "--items", "50"]) == 0
    assert capsys.readouterr().out.startswith(f"using cached data in {data}")
    assert train_loop.main([*base, "--items", "50", "--features", "4", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rebuilding {data}: it holds other data (features 20 -> 4, seed 0 -> 7)")
    with blocking.PickledDataset(data) as ds:
        assert ds.query_item(0)["x"].shape == (4,)
    # Generated again, the data is exactly what a fresh cache holds.
    fresh = tmp_path / "fresh.pickle"
    train_loop.prepare(fresh, items=50, features=4, separation=3.0, seed=7)
    with blocking.PickledDataset(data) as ds, blocking.PickledDataset(fresh) as other:
        keys = ds.keys.all()
        assert keys == other.keys.all()
        a, b = ds.query(keys), other.query(keys)
        assert (a["x"] == b["x"]).all()
        assert (a["y"] == b["y"]).all()


def test_a_cache_that_does_not_say_what_it_holds_is_generated_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.pickle"
    # A cache written before the settings were recorded: no context.
    blocking.PickledDataset.create(DictDataset({i: {"x": [0.0], "y": 0.0} for i in range(9)}), data)
    assert train_loop.main(["--data", str(data), "--items", "64", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rebuilding {data}: it does not say which data it holds\n")
    with blocking.PickledDataset(data) as ds:
        assert len(ds) == 64


def test_a_file_that_is_not_a_dataset_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "notes.txt"
    data.write_text("someone's notes, not a cache\n")
    assert train_loop.main(["--data", str(data), "--items", "64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data} is not a readable PickledDataset file")
    assert f"pass another --data, or remove {data}" in err
    assert data.read_text() == "someone's notes, not a cache\n"


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
