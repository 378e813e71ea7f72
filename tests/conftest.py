"""Shared fixtures."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``condition()`` holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def block_until_exists(path: str, timeout: float = 10.0) -> None:
    """Block the calling thread (a worker's) until ``path`` exists, for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.002)


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A Dask ``LocalCluster`` of two single-threaded worker processes on 127.0.0.1."""
    distributed = pytest.importorskip("distributed")
    dask = pytest.importorskip("dask")
    # A task whose worker dies fails at once, rather than being tried on another.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        # Not the default client: the fixture may first be set up inside an async
        # test, whose context differs from the one that tears it down.
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client
