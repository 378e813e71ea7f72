"""The parallel downloader examples, end to end against a loopback HTTP server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples import parallel_download, parallel_download_sync
from mlworkflow_async import PickledDataset

from ._http_server import FileServer, refused_url, serve_files, sha256

ROOT = Path(__file__).resolve().parent.parent
FILE_COUNT = 300


def make_files(count: int = FILE_COUNT) -> dict[str, bytes]:
    # Distinct contents of varied sizes, so a mixed-up or truncated body shows.
    return {
        f"file-{i:03d}.bin": os.urandom(16 + (i * 37) % 900) + i.to_bytes(2, "big")
        for i in range(count)
    }


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serve_files(make_files(), delay=0.003) as state:
        yield state


def url_list(tmp_path: Path, urls: list[str]) -> Path:
    path = tmp_path / "urls.txt"
    path.write_text("# to download\n" + "\n".join(urls) + "\n")
    return path


def check_bound(server: FileServer, bound: int) -> None:
    assert server.max_active <= bound, f"{server.max_active} requests at once, bound {bound}"
    assert server.max_active > 1, "downloads never overlapped"


# -- async: PickledDataset.create over a dataset of URLs ----------------------


def test_async_downloads_every_file_intact_within_the_bound(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "downloads.pickle"
    urls = [server.url(name) for name in server.files]
    code = parallel_download.main(
        ["--url-list", str(url_list(tmp_path, urls)), "--out", str(out), "--concurrency", "8"]
    )
    assert code == 0
    with PickledDataset(out) as stored:
        assert sorted(stored.sync.keys.all()) == sorted(urls)
        items = stored.sync.query_items(urls)
    for url, item in zip(urls, items, strict=True):
        assert sha256(item) == sha256(server.files[url.rpartition("/")[2]]), url
    assert server.requests == FILE_COUNT
    check_bound(server, 8)
    output = capsys.readouterr()
    assert f"downloading {FILE_COUNT} URLs, at most 8 at a time" in output.out
    assert f"stored {FILE_COUNT} downloads" in output.out
    assert f"{FILE_COUNT}/{FILE_COUNT}" in output.err  # the progress bar, finished


def test_async_failure_names_the_url_and_writes_nothing(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "downloads.pickle"
    missing = server.url("no-such-file.bin")
    urls = [server.url(name) for name in list(server.files)[:40]]
    code = parallel_download.main(
        ["--out", str(out), "--concurrency", "4", "--no-progress", *urls[:20], missing, *urls[20:]]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: GET {missing} failed: HTTP 404 Not Found" in err
    assert "--skip-failed" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


def test_async_skip_failed_stores_the_rest_and_lists_failures(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "downloads.pickle"
    missing, refused = server.url("gone.bin"), refused_url()
    good = [server.url(name) for name in list(server.files)[:80]]
    urls = [*good[:30], missing, *good[30:60], refused, *good[60:]]
    code = parallel_download.main(
        ["--out", str(out), "--concurrency", "6", "--skip-failed", "--no-progress", *urls]
    )
    assert code == 0
    with PickledDataset(out) as stored:
        assert stored.sync.keys.all() == list(good)  # in order, failures left out
        for url, item in zip(good, stored.sync.query_items(good), strict=True):
            assert sha256(item) == sha256(server.files[url.rpartition("/")[2]])
    check_bound(server, 6)
    lines = capsys.readouterr().out.splitlines()
    assert "stored 80 downloads" in lines[1]
    assert lines[2] == "skipped 2 failed URLs:"
    assert lines[3] == f"  GET {missing} failed: HTTP 404 Not Found"
    assert lines[4] == f"  GET {refused} failed: ConnectError: Connection refused"


async def test_async_download_function_reports_failures(
    server: FileServer, tmp_path: Path
) -> None:
    out = tmp_path / "some.pickle"
    missing = server.url("missing.bin")
    urls = [server.url("file-001.bin"), missing, server.url("file-002.bin")]
    report = await parallel_download.download(
        urls, out, concurrency=2, skip_failed=True, progress=False
    )
    assert report.stored == 2
    assert list(report.failures) == [missing]
    assert report.failures[missing].status == 404
    assert report.downloaded_bytes == len(server.files["file-001.bin"]) + len(
        server.files["file-002.bin"]
    )
    async with await PickledDataset.open(out) as stored:
        assert await stored.keys.all() == [urls[0], urls[2]]


# -- sync: the blocking SideRunner, seed style --------------------------------


def test_sync_downloads_every_file_intact_within_the_bound(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "files"
    urls = [server.url(name) for name in server.files]
    code = parallel_download_sync.main(
        ["--url-list", str(url_list(tmp_path, urls)), "--out-dir", str(out_dir)]
    )
    assert code == 0
    saved = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    assert set(saved) == set(server.files)  # no temporary file left either
    for name, data in saved.items():
        assert sha256(data) == sha256(server.files[name]), name
    check_bound(server, 10)
    out = capsys.readouterr().out
    assert f"downloading {FILE_COUNT} URLs, 10 at a time" in out
    assert f"saved {FILE_COUNT} files" in out


def test_sync_failures_name_the_url(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "files"
    missing = server.url("absent.bin")
    urls = [server.url(name) for name in list(server.files)[:30]] + [missing]
    code = parallel_download_sync.main(["--out-dir", str(out_dir), "--pool-size", "4", *urls])
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: GET {missing} failed: HTTP 404 Not Found" in err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(list(server.files)[:30])


def test_sync_skip_failed_keeps_going(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "files"
    missing, refused = server.url("absent.bin"), refused_url()
    good = [server.url(name) for name in list(server.files)[:80]]
    saved, failures = parallel_download_sync.download_all(
        [missing, *good[:40], refused, *good[40:]], out_dir, pool_size=5, skip_failed=True
    )
    assert list(failures) == [missing, refused]
    assert failures[missing].status == 404
    assert str(failures[refused]) == f"GET {refused} failed: ConnectError: Connection refused"
    assert set(saved) == set(good)
    for url, path in saved.items():
        assert sha256(path.read_bytes()) == sha256(server.files[url.rpartition("/")[2]])
    check_bound(server, 5)


def test_sync_rejects_urls_saved_under_the_same_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parallel_download_sync.main(
            ["--out-dir", str(tmp_path), "http://h/a/x.bin", "http://h/b/x.bin"]
        )
    assert "would both be saved as 'x.bin'" in capsys.readouterr().err


# -- as scripts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "out_option"),
    [("parallel_download.py", "--out"), ("parallel_download_sync.py", "--out-dir")],
)
def test_runs_as_a_script(
    server: FileServer, tmp_path: Path, script: str, out_option: str
) -> None:
    out = tmp_path / "out"
    urls = [server.url(name) for name in list(server.files)[:12]]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), out_option, str(out), *urls],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "downloading 12 URLs" in result.stdout
    assert server.requests == 12
