"""Apply a function to many arguments: async with bounded concurrency, or sync in one pass."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import anyio

__all__ = ["map_concurrently", "map_each"]

A = TypeVar("A")
R = TypeVar("R")


async def map_concurrently(
    fn: Callable[[A], Awaitable[R]], args: Sequence[A], limit: int = 64
) -> list[R]:
    """``[await fn(a) for a in args]``, with at most ``limit`` calls running at once.

    A fixed set of workers claims arguments in order, so no task is made per
    argument. The first failure cancels the rest and is raised as it is,
    not wrapped in an exception group.
    """
    count = len(args)
    if count == 1:
        return [await fn(args[0])]
    results: list[Any] = [None] * count
    claimed = 0

    async def worker() -> None:
        nonlocal claimed
        while claimed < count:
            index = claimed
            claimed += 1
            results[index] = await fn(args[index])

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(min(limit, count)):
                tg.start_soon(worker)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return results


def map_each(
    fn: Callable[..., R], *columns: Iterable[Any], on_error: Callable[[Exception, int], None]
) -> list[R]:
    """``[fn(*row) for row in zip(*columns)]``, looping in C rather than in Python.

    When a call raises, ``on_error(exc, index)`` learns which row failed (to
    add a note naming its key) before the exception propagates as it is.
    The columns must have the same length.

    >>> map_each(divmod, [7, 9], [2, 4], on_error=lambda exc, index: None)
    [(3, 1), (2, 1)]
    """
    results: list[R] = []
    try:
        results.extend(map(fn, *columns))
    except Exception as exc:
        # extend() keeps what it appended before the failing call.
        on_error(exc, len(results))
        raise
    return results
