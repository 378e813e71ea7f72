"""Forking a process that holds a blocking object, to see the child refuse to use it."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any


def refusal_in_forked_child(
    folder: Path, use: Callable[[], Any], close: Callable[[], Any], error: type[BaseException]
) -> str:
    """The message of ``error`` that ``use()`` raises in a forked child, which then
    calls ``close()`` (a no-op there: what it closes belongs to the parent)."""
    report = folder / "child.txt"

    def child() -> None:
        try:
            use()
        except error as exc:
            close()
            report.write_text(str(exc))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(30)
    assert process.exitcode == 0
    return report.read_text()
