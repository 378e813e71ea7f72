"""Apply an async function to many arguments with bounded concurrency."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

__all__ = ["map_concurrently"]

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
