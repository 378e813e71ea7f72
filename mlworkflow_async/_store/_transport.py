"""What a remote transport is: the requests of one URL, as :mod:`._remote` makes them.

:mod:`._http` (``http(s)://``, on ``httpx``) and :mod:`._fsspec` (any other
URL) implement :class:`Transport`; :class:`~._remote.RemoteSource` adds the
batching, the per-host bounds, the retries and the cache on top.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

__all__ = ["Opened", "Transient", "Transport"]


class Opened(NamedTuple):
    """What opening a file on a server tells: its size, a validator, and its last bytes."""

    size: int
    validator: str
    tail_start: int
    tail: bytes


class Transient(Exception):
    """A failure worth trying again (the message says what happened)."""


class Transport(Protocol):
    """One URL's requests: what :mod:`._http` and :mod:`._fsspec` implement."""

    url: str
    host: str

    async def open(self, tail: int) -> Opened: ...
    async def fetch(self, start: int, stop: int) -> bytes: ...
    async def aclose(self) -> None: ...
    def close(self) -> None: ...
