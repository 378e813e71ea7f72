"""The README's Examples section: its shell commands run as written, on loopback.

The ```bash blocks are taken from the README itself and run with bash, with
three substitutions only: this test's Python for ``python3`` and
``.venv/bin/python``, the absolute path of ``examples/``, and free loopback
ports for 8000 and 8001 (which other programs may hold).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from mlworkflow_async import PickledDataset

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SECTION = README[README.index("\n## Examples\n") :]
SECTION = SECTION[: SECTION.index("\n## ", 1)]
BLOCKS = re.findall(r"^```bash\n(.*?)^```", SECTION, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The command lines of a block, without their comments."""
    lines = (line.partition("  #")[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def adapt(line: str, ports: dict[str, int]) -> str:
    python = shlex.quote(sys.executable)
    line = re.sub(r"^(\.venv/bin/python|python3) ", python + " ", line)
    line = line.replace(" examples/", f" {shlex.quote(str(ROOT))}/examples/")
    for number, port in ports.items():
        line = re.sub(rf"\b{number}\b", str(port), line)
    return line


def run(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    return result


@contextmanager
def background(line: str, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """Run ``line`` (a server) in the background for the block, then stop it with Ctrl-C."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {line}"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        assert process.stdout is not None
        process.stdout.close()


def wait_until_listening(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "the server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.02)


def test_the_section_has_its_blocks() -> None:
    assert len(BLOCKS) == 6, BLOCKS


def test_install_block_installs_the_examples_extra() -> None:
    assert commands(BLOCKS[0]) == [
        "python3 -m venv .venv",
        ".venv/bin/pip install -e '.[examples]'",
    ]
    assert shlex.split(commands(BLOCKS[0])[1])[-1] == ".[examples]"


def third_party_imports(path: Path) -> set[str]:
    """Top-level modules ``path`` imports unconditionally (not under ``except ImportError``)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_Try(self, node: ast.Try) -> None:
            optional = any(
                isinstance(handler.type, ast.Name) and handler.type.id == "ImportError"
                for handler in node.handlers
            )
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                self.visit(child)
            if not optional:
                for child in node.body:
                    self.visit(child)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name.partition(".")[0] for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0 and node.module is not None:
                found.add(node.module.partition(".")[0])

    Visitor().visit(ast.parse(path.read_text(), str(path)))
    return found - set(sys.stdlib_module_names) - {"__future__", "mlworkflow_async"}


def requirement_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group()).lower()


def test_the_examples_extra_has_what_the_examples_import() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = {
        requirement_name(r)
        for r in [*project["dependencies"], *project["optional-dependencies"]["examples"]]
    }
    distributions = importlib.metadata.packages_distributions()
    modules = set().union(*map(third_party_imports, (ROOT / "examples").glob("*.py")))
    assert {"aiofiles", "httpx", "numpy", "starlette", "uvicorn"} <= modules
    for module in sorted(modules):
        names = {requirement_name(name) for name in distributions[module]}
        assert names & installed, f"examples import {module}, not in the examples extra"


def test_file_server_and_downloader_commands_run_as_written(tmp_path: Path) -> None:
    ports = {"8000": free_port()}
    make_files, serve = commands(BLOCKS[1])
    assert serve == "python3 -m http.server 8000 --bind 127.0.0.1 --directory files"
    run(make_files, tmp_path)
    files = sorted((tmp_path / "files").iterdir())
    assert [path.name for path in files] == sorted(f"file{i}.txt" for i in range(20))
    assert (tmp_path / "files" / "file7.txt").read_text() == "content of file 7\n"

    outputs = []
    with background(adapt(serve, ports), tmp_path) as server:
        wait_until_listening(ports["8000"], server)
        for line in commands(BLOCKS[2]):
            outputs.append(run(adapt(line, ports), tmp_path).stdout)

    stored, info, saved, saved_sync = outputs
    assert "stored 20 downloads (" in stored
    with PickledDataset(tmp_path / "pages.pickle") as ds:
        url = f"http://127.0.0.1:{ports['8000']}/file3.txt"
        assert len(ds) == 20
        assert ds.sync.query_item(url) == b"content of file 3\n"
    assert "20" in info
    assert "saved 20 files (" in saved
    assert "skipped 1 failed URL:" in saved
    assert "missing.txt failed: HTTP 404" in saved
    assert "saved 20 files (" in saved_sync
    for folder in ("pages", "pages-sync"):
        copies = sorted((tmp_path / folder).iterdir())
        assert [path.name for path in copies] == [path.name for path in files]
        for copy, original in zip(copies, files, strict=True):
            assert copy.read_bytes() == original.read_bytes()


def test_training_and_service_commands_run_as_written(tmp_path: Path) -> None:
    ports = {"8001": free_port()}
    train, serve = commands(BLOCKS[3])
    assert run(adapt(train, ports), tmp_path).stdout.startswith(
        "cached 2048 items in train.pickle"
    )
    assert (tmp_path / "train.pickle").is_file()

    curls = commands(BLOCKS[4])
    with background(adapt(serve, ports), tmp_path) as service:
        assert service.stdout is not None
        listening = service.stdout.readline()
        assert listening == f"data service listening on http://127.0.0.1:{ports['8001']}\n"
        assert service.stdout.readline().startswith("ready on ")
        answers = []
        for line in curls:
            words = shlex.split(adapt(line, ports))
            assert words[0] == "curl"
            answers.append(httpx.get(words[1], timeout=30).json())
        service.send_signal(signal.SIGINT)
        assert service.wait(15) == 0
    batch, health = answers
    assert len(batch["keys"]) == 4
    assert health["status"] == "ok"


def test_every_script_named_exists_and_every_script_is_shown() -> None:
    named = {
        word
        for block in BLOCKS
        for line in commands(block)
        for word in shlex.split(line)
        if word.startswith("examples/")
    }
    scripts = {f"examples/{path.name}" for path in (ROOT / "examples").glob("[!_]*.py")}
    assert named == scripts


def test_remote_training_command_runs_as_written(tmp_path: Path) -> None:
    (line,) = commands(BLOCKS[5])
    output = run(adapt(line, {}), tmp_path).stdout
    assert "epoch 3/3" in output
    assert (tmp_path / "served" / "train.pkl").is_file()
    assert list((tmp_path / "remote-cache").glob("*.ranges"))
