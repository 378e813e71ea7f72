"""Plain functions that worker processes import by name (process pools, Dask workers)."""

from __future__ import annotations

import os


def sum_of_squares(n: int) -> int:
    return sum(i * i for i in range(n))


def where(x: int) -> tuple[int, int]:
    """Return ``x`` and the id of the process that ran the call."""
    return x, os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


def token() -> str:
    """A fresh random token: two calls differ unless one was skipped."""
    return os.urandom(8).hex()
