"""Sources for the sharded-dataset tests, importable by Dask workers and pool processes."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import numpy as np

from mlworkflow_async import Dataset


def item(key: int) -> dict[str, Any]:
    return {"i": key, "x": np.full(8, key, dtype=np.int64), "tag": ("t", key)}


class Numbers(Dataset[int, Any]):
    """Items ``0..n-1``, computed; ``context`` says who made them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.context = {"made_by": "Numbers", "n": n}

    def yield_keys(self) -> range:
        return range(self.n)

    async def query_item(self, key: int) -> Any:
        return item(key)


class KillsItsWorker(Numbers):
    """Like :class:`Numbers`, but the process computing key ``at`` kills itself (SIGKILL).

    Only in another process than the one that made it: the test process survives.
    """

    def __init__(self, n: int, at: int) -> None:
        super().__init__(n)
        self.at = at
        self.home = os.getpid()

    async def query_item(self, key: int) -> Any:
        if key == self.at and os.getpid() != self.home:
            os.kill(os.getpid(), signal.SIGKILL)
        return item(key)


class Fails(Numbers):
    """Raises ``ValueError`` at key ``at``."""

    def __init__(self, n: int, at: int) -> None:
        super().__init__(n)
        self.at = at

    async def query_item(self, key: int) -> Any:
        if key == self.at:
            raise ValueError(f"no item {key} today")
        return item(key)


class Connection:
    """Something holding what cannot leave its process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


class HoldsLock(Numbers):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.backend = {"primary": Connection()}
