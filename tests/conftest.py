"""Shared fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``condition()`` holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not condition():
            await asyncio.sleep(0.001)
