"""Every ```python block of the README runs, so the documentation cannot drift."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

from tests._http_server import serve_files

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(BLOCKS[index])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    files = {f"file{i}.txt": f"content of file {i}\n".encode() for i in range(20)}
    with serve_files(files) as server:  # for the downloader examples
        monkeypatch.setenv("FILES_URL", server.base_url)
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip(), "every README example prints what it did"
    if "FILES_URL" in BLOCKS[index]:
        total = sum(map(len, files.values()))
        assert f"20 files, {total} bytes" in out
        assert 1 < server.max_active <= 10
