"""The ``info``, ``verify`` and ``convert`` commands of ``python -m mlworkflow_async``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import mlworkflow
import numpy as np
import pytest

from mlworkflow_async import PickledDataset
from mlworkflow_async.__main__ import main

from ._pickled_util import assert_same, write_file, write_original_file

ITEMS = {f"item{i}": {"x": np.full(3, i), "i": i} for i in range(20)}


@pytest.fixture
def new_file(tmp_path: Path) -> Path:
    path = tmp_path / "new.pkl"
    write_file(path, ITEMS, {"split": "test"})
    return path


@pytest.fixture
def legacy_file(tmp_path: Path) -> Path:
    path = tmp_path / "legacy.pkl"
    write_original_file(path, ITEMS, {"from": "mlworkflow 0.6"})
    return path


def test_info(new_file: Path, legacy_file: Path, capsys: Any) -> None:
    assert main(["info", str(new_file)]) == 0
    out = capsys.readouterr().out
    assert "format version 2" in out
    assert "items:   20" in out
    assert f"{new_file.stat().st_size:,} bytes" in out
    assert "'item0', 'item1', 'item2', 'item3', 'item4', ... (15 more)" in out
    assert "{'split': 'test'}" in out

    assert main(["info", str(legacy_file), "--safe"]) == 0
    out = capsys.readouterr().out
    assert "original mlworkflow" in out
    assert "{'from': 'mlworkflow 0.6'}" in out


def test_verify_good_and_broken_files(new_file: Path, capsys: Any) -> None:
    assert main(["verify", str(new_file)]) == 0
    assert "OK: all 20 items" in capsys.readouterr().out

    with PickledDataset(new_file) as ds:
        offsets = {key: entry[0] for key, entry in ds._reader.entries.items()}
    data = bytearray(new_file.read_bytes())
    for key in ("item13", "item7"):
        data[offsets[key]] = 0xFF  # breaks the pickle of these items
    new_file.write_bytes(bytes(data))
    assert main(["verify", str(new_file)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN: item 'item7'" in out  # the first in key order
    assert "item13" not in out


def test_verify_and_info_of_a_file_that_is_not_a_dataset(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"this is not a dataset at all")
    assert main(["verify", str(path)]) == 1
    assert main(["info", str(path)]) == 1
    assert main(["info", str(tmp_path / "absent.pkl")]) == 1
    err = capsys.readouterr().err
    assert "junk.pkl is not a readable PickledDataset file" in err
    assert "absent.pkl" in err


def test_convert_a_legacy_file_in_a_real_process(legacy_file: Path, tmp_path: Path) -> None:
    converted = tmp_path / "converted.pkl"
    result = subprocess.run(
        [sys.executable, "-m", "mlworkflow_async", "convert", str(legacy_file), str(converted)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "converted 20 items" in result.stdout
    with PickledDataset(converted) as ds:
        assert ds.format_version == 2
        assert ds.context == {"from": "mlworkflow 0.6"}
        keys = list(ITEMS)
        for key, item in zip(keys, ds.sync.query_items(keys), strict=True):
            assert_same(ITEMS[key], item)


def test_failed_convert_leaves_the_target_alone(tmp_path: Path, capsys: Any) -> None:
    broken, target = tmp_path / "broken.pkl", tmp_path / "target.pkl"
    source = mlworkflow.DictDataset({"a": 1, "b": 2})
    mlworkflow.PickledDataset.create(source, str(broken))
    with PickledDataset(broken) as ds:
        offset = ds._reader.entries["b"][0]
    data = bytearray(broken.read_bytes())
    data[offset] = 0xFF
    broken.write_bytes(bytes(data))
    target.write_bytes(b"previous content")
    assert main(["convert", str(broken), str(target)]) == 1
    assert "item 'b'" in capsys.readouterr().err
    assert target.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pkl", "target.pkl"]
