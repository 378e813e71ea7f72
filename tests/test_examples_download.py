"""The parallel downloader examples, end to end against a loopback HTTP server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


# -- async: a file each, with --out-dir and aiofiles ---------------------------


def saved_files(out_dir: Path) -> dict[str, bytes]:
    """Every file in ``out_dir``, temporary ones included, by name."""
    return {path.name: path.read_bytes() for path in out_dir.iterdir()}


def test_async_out_dir_saves_every_file_intact_within_the_bound(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "pages"
    urls = [server.url(name) for name in server.files]
    code = parallel_download.main(
        ["--url-list", str(url_list(tmp_path, urls)), "--out-dir", str(out_dir),
         "--concurrency", "8"]
    )
    assert code == 0
    saved = saved_files(out_dir)
    assert set(saved) == set(server.files)  # no temporary file left either
    for name, data in saved.items():
        assert sha256(data) == sha256(server.files[name]), name
    assert server.requests == FILE_COUNT
    check_bound(server, 8)
    output = capsys.readouterr()
    total = sum(map(len, server.files.values()))
    assert f"downloading {FILE_COUNT} URLs, at most 8 at a time, into {out_dir}" in output.out
    assert f"saved {FILE_COUNT} files ({total / 1000:.1f} kB) in {out_dir}" in output.out
    assert f"{FILE_COUNT}/{FILE_COUNT}" in output.err  # the progress bar, finished


def test_async_out_dir_skip_failed_saves_the_rest_and_nothing_of_the_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_files(60)
    files["cut.bin"] = os.urandom(200_000)  # its connection closes half-way
    out_dir = tmp_path / "pages"
    with serve_files(files, cut=["cut.bin"]) as server:
        missing, refused, cut = server.url("gone.bin"), refused_url(), server.url("cut.bin")
        good = [server.url(name) for name in list(files)[:60]]
        urls = [*good[:20], cut, *good[20:40], missing, *good[40:], refused]
        code = parallel_download.main(
            ["--out-dir", str(out_dir), "--concurrency", "6", "--skip-failed", "--no-progress",
             *urls]
        )
        check_bound(server, 6)
    assert code == 0
    saved = saved_files(out_dir)
    assert set(saved) == {url.rpartition("/")[2] for url in good}  # nothing of the failures
    for name, data in saved.items():
        assert sha256(data) == sha256(files[name]), name
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("saved 60 files (")
    assert lines[2] == "skipped 3 failed URLs:"  # in the order of the URLs
    assert lines[3].startswith(
        f"  GET {cut} failed: RemoteProtocolError: peer closed connection without sending "
        "complete message body"
    )
    assert lines[4] == f"  GET {missing} failed: HTTP 404 Not Found"
    assert lines[5] == f"  GET {refused} failed: ConnectError: Connection refused"


def test_async_out_dir_failure_stops_the_run_and_leaves_no_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_files(40)
    files["cut.bin"] = os.urandom(500_000)
    out_dir = tmp_path / "pages"
    with serve_files(files, cut=["cut.bin"]) as server:
        cut = server.url("cut.bin")
        urls = [server.url(name) for name in list(files)[:40]]
        code = parallel_download.main(
            ["--out-dir", str(out_dir), "--concurrency", "4", "--no-progress",
             *urls[:10], cut, *urls[10:]]
        )
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: GET {cut} failed: RemoteProtocolError: peer closed connection" in err
    assert f"the downloads completed meanwhile are in {out_dir}, none half-written" in err
    assert "pass --skip-failed" in err
    saved = saved_files(out_dir)
    # The downloads cancelled by the failure left nothing either: only whole files.
    assert "cut.bin" not in saved
    assert set(saved) <= set(files)
    for name, data in saved.items():
        assert sha256(data) == sha256(files[name]), name


async def test_async_download_files_reports_failures_in_order(
    server: FileServer, tmp_path: Path
) -> None:
    out_dir = tmp_path / "new" / "folder"  # made as needed
    missing, refused = server.url("missing.bin"), refused_url()
    urls = [refused, server.url("file-001.bin"), missing, server.url("file-002.bin")]
    report = await parallel_download.download_files(
        urls, out_dir, concurrency=2, skip_failed=True, progress=False
    )
    assert report.stored == 2
    assert list(report.failures) == [refused, missing]
    assert report.failures[missing].status == 404
    assert report.downloaded_bytes == len(server.files["file-001.bin"]) + len(
        server.files["file-002.bin"]
    )
    assert sorted(saved_files(out_dir)) == ["file-001.bin", "file-002.bin"]


async def test_async_download_files_rejects_urls_saved_under_the_same_name(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"would both be saved as 'x\.bin' in "):
        await parallel_download.download_files(
            ["http://h/a/x.bin", "http://h/b/x.bin"], tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_async_out_dir_rejects_urls_saved_under_the_same_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parallel_download.main(
            ["--out-dir", str(tmp_path), "http://h/a/x.bin", "http://h/b/x.bin"]
        )
    assert "would both be saved as 'x.bin'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parallel_download.main(["--out", "a.pickle", "--out-dir", str(tmp_path), "http://h/x"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["interrupted", "killed"])
def test_async_out_dir_stopped_mid_download_leaves_no_partial_file_under_its_name(
    tmp_path: Path, how: str
) -> None:
    files = make_files(20)
    big = os.urandom(4 * parallel_download.WRITE_CHUNK)  # half of it is sent, then held
    files["big.bin"] = big
    out_dir = tmp_path / "pages"
    with serve_files(files, held=["big.bin"]) as server:
        urls = [server.url("big.bin"), *(server.url(name) for name in list(files)[:20])]
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "parallel_download.py"),
             "--out-dir", str(out_dir), "--no-progress", "--concurrency", "4", *urls],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        try:
            assert server.half_sent.wait(30), "the held download never started"
            # Bounded wait for the client to have written part of it.
            deadline = time.monotonic() + 30
            while not [p for p in out_dir.glob(".big.bin.*.part") if p.stat().st_size > 0]:
                assert time.monotonic() < deadline, "no part of the download was written"
                assert process.poll() is None, process.communicate()
                time.sleep(0.01)
            process.send_signal(signal.SIGINT if how == "interrupted" else signal.SIGKILL)
            err = process.communicate(timeout=30)[1]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    saved = saved_files(out_dir)
    parts = {name: data for name, data in saved.items() if name.endswith(".part")}
    whole = {name: data for name, data in saved.items() if name not in parts}
    assert "big.bin" not in whole  # never half-written under its name
    for name, data in whole.items():
        assert sha256(data) == sha256(files[name]), name
    if how == "interrupted":
        assert process.returncode == 130, err
        assert f"interrupted: the downloads completed meanwhile are in {out_dir}" in err
        assert parts == {}  # every download in flight removed its temporary file
    else:
        assert process.returncode == -signal.SIGKILL
        # A killed process cannot clean up: what it was writing stays a .part.
        big_parts = [data for name, data in parts.items() if name.startswith(".big.bin.")]
        assert len(big_parts) == 1
        assert 0 < len(big_parts[0]) < len(big)
        assert big.startswith(big_parts[0])


# -- counts in the messages -----------------------------------------------------


def test_one_of_a_kind_is_singular(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, missing = server.url("file-007.bin"), server.url("missing.bin")
    size = len(server.files["file-007.bin"])
    assert 1 < size < 1000
    for argv in (["--out", str(tmp_path / "one.pickle")], ["--out-dir", str(tmp_path / "a")]):
        assert parallel_download.main([*argv, "--no-progress", one]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("downloading 1 URL, at most 10 at a time")
        verb_count = "stored 1 download" if argv[0] == "--out" else "saved 1 file"
        assert lines[1].startswith(f"{verb_count} ({size} bytes) in ")
        assert parallel_download.main([*argv, "--no-progress", "--skip-failed", one, missing]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("downloading 2 URLs,")
        assert lines[2] == "skipped 1 failed URL:"
    assert (tmp_path / "one.pickle").is_file()
    assert sorted(saved_files(tmp_path / "a")) == ["file-007.bin"]

    out_dir = tmp_path / "b"
    assert parallel_download_sync.main(["--out-dir", str(out_dir), one]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("downloading 1 URL, 10 at a time")
    assert lines[1].startswith(f"saved 1 file ({size} bytes) in {out_dir}")
    code = parallel_download_sync.main(["--out-dir", str(out_dir), "--skip-failed", one, missing])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("downloading 2 URLs,")
    assert lines[2] == "skipped 1 failed URL:"


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
