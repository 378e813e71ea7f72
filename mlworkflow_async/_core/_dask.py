"""A ``dask.distributed.Client`` as a :class:`concurrent.futures.Executor`.

Dask's own ``Client.get_executor()`` cancels each future with a blocking
round trip to the scheduler, made by the thread that cancels: leaving a
stream with N chunks in flight blocked the event loop for N round trips
(across a network, many milliseconds each). :meth:`ClientExecutor.drop`
cancels any number of futures in one message, from a worker thread.

Dask stays optional: the client is only used through its methods.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ClientExecutor", "is_dask_client"]


def is_dask_client(executor: Any) -> bool:
    """True for a ``dask.distributed.Client`` (or a subclass), recognised without importing dask.

    >>> is_dask_client(object())
    False
    """
    return any(
        kind.__name__ == "Client" and kind.__module__.split(".")[0] == "distributed"
        for kind in type(executor).__mro__
    )


class ClientExecutor(cf.Executor):
    """Submits calls to a Dask client (``pure=False``: identical calls all run).

    The futures it returns are plain :class:`concurrent.futures.Future`
    objects, settled from the client's own event loop (its thread).
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._lock = threading.Lock()
        # Local future -> Dask future, while not done.
        self._remote: dict[cf.Future[Any], Any] = {}

    def __repr__(self) -> str:
        return f"<ClientExecutor {self.client!r}>"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        remote = self.client.submit(fn, *args, pure=False, **kwargs)
        local: cf.Future[Any] = cf.Future()
        with self._lock:
            self._remote[local] = remote
        # The result is fetched on the client's own loop, as Dask's executor
        # does, so that results arriving together are fetched together.
        self.client.loop.add_callback(self._settle, local, remote)
        return local

    async def _settle(self, local: cf.Future[Any], remote: Any) -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = await self.client.gather(remote, asynchronous=True)
        except BaseException as exc:
            error = exc
        with self._lock:
            self._remote.pop(local, None)
        with contextlib.suppress(cf.InvalidStateError):  # cancelled here meanwhile
            if remote.status == "cancelled":
                local.cancel()
            elif error is not None:
                local.set_exception(error)
            else:
                local.set_result(value)

    def drop(self, futures: Iterable[cf.Future[Any]]) -> None:
        """Cancel ``futures`` (made here) in one message.

        Blocks for a round trip to the scheduler: call it from a worker thread.
        """
        futures = list(futures)
        with self._lock:
            found = [self._remote.pop(f) for f in futures if f in self._remote]
        for future in futures:
            future.cancel()
        if found:
            self.client.cancel(found)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Leaves the client as it is: it belongs to the caller."""
