"""A dataset whose failing fetches are tried again, with backoff (built on tenacity)."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Hashable
from typing import TypeVar

import anyio

from .._core._dataset import Dataset
from .._core._engine import current_stats
from ._derived import SameKeys

__all__ = ["RetryingDataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger("mlworkflow_async")


def _exception_types(on: object) -> tuple[type[BaseException], ...]:
    types = on if isinstance(on, tuple) else (on,)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise TypeError(
            f"on= takes an exception class or a tuple of them (on=(OSError, TimeoutError), "
            f"say), got {on!r}"
        )
    return types


class RetryingDataset(SameKeys[K, V]):
    """The items of ``parent``, fetched again when ``query_item`` raises one of ``on``.

    Each key gets up to ``attempts`` tries, separated by exponential backoff
    with jitter (``initial_wait`` seconds doubling up to ``max_wait``, plus up
    to ``initial_wait`` at random, so that many failing keys do not retry in
    step). With ``timeout``, an attempt that takes longer than ``timeout``
    seconds is cancelled and counts as a ``TimeoutError`` (always retried).
    Other exceptions propagate at once. Each retry is logged (logger
    ``mlworkflow_async``, level WARNING) with its key, and counted in the
    ``stats.retried`` of the stream that asked; the final failure propagates
    with a note naming its key and the attempts made. It needs the ``retry``
    extra (``pip install 'mlworkflow-async[retry]'``, for tenacity).

    >>> import asyncio
    >>> from mlworkflow_async import Dataset
    >>> class Flaky(Dataset[int, int]):
    ...     failures = 2
    ...     def yield_keys(self):
    ...         return [1, 2]
    ...     async def query_item(self, key):
    ...         if self.failures:
    ...             self.failures -= 1
    ...             raise ConnectionResetError("the server hung up")
    ...         return key * 10
    >>> ds = RetryingDataset(Flaky(), attempts=3, initial_wait=0.001)
    >>> asyncio.run(ds.query_items([1, 2]))
    [10, 20]
    """

    batched_queries = False  # retries are per item: a failing key never refetches its batch

    on: tuple[type[BaseException], ...]
    attempts: int
    timeout: float | None
    initial_wait: float
    max_wait: float
    _retry_on: tuple[type[BaseException], ...]

    def __init__(
        self,
        parent: Dataset[K, V],
        on: type[BaseException] | tuple[type[BaseException], ...] = (OSError, TimeoutError),
        attempts: int = 3,
        timeout: float | None = None,
        *,
        initial_wait: float = 0.1,
        max_wait: float = 10.0,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, numbers.Integral):
            raise TypeError(f"attempts must be an integer of at least 1, got {attempts!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1 (1: no retry), got {attempts!r}")
        for name, value in (("initial_wait", initial_wait), ("max_wait", max_wait)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or timeout <= 0
        ):
            raise ValueError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
        try:
            import tenacity  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "RetryingDataset retries with tenacity, which is not installed: "
                "pip install 'mlworkflow-async[retry]'"
            ) from exc
        self.parent = parent
        self.on = _exception_types(on)
        self.attempts = int(attempts)
        self.timeout = None if timeout is None else float(timeout)
        self.initial_wait = float(initial_wait)
        self.max_wait = float(max_wait)
        # A timed-out attempt is retried whatever ``on`` says: that is what the timeout is for.
        self._retry_on = self.on if timeout is None else (*self.on, TimeoutError)

    async def query_item(self, key: K) -> V:
        from tenacity import (
            AsyncRetrying,
            RetryCallState,
            retry_if_exception_type,
            stop_after_attempt,
            wait_exponential,
            wait_random,
        )

        def before_sleep(state: RetryCallState) -> None:
            stats = current_stats.get()
            if stats is not None:
                stats.retried += 1
            outcome = state.outcome
            exc = outcome.exception() if outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            logger.warning(
                "%s: attempt %d of %d for key %r failed (%s: %s); retrying in %.3f s",
                type(self).__name__, state.attempt_number, self.attempts, key,
                type(exc).__name__, exc, wait,
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=self.initial_wait, max=self.max_wait)
            + wait_random(0, self.initial_wait),
            retry=retry_if_exception_type(self._retry_on),
            sleep=anyio.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        attempt = 0
        try:
            async for try_ in retrying:
                with try_:
                    attempt = try_.retry_state.attempt_number
                    return await self._attempt(key)
        except Exception as exc:
            if isinstance(exc, self._retry_on):
                exc.add_note(
                    f"{type(self).__name__} gave up on key {key!r} after {attempt} "
                    f"attempt{'s' if attempt > 1 else ''}"
                )
            raise
        raise AssertionError("unreachable: tenacity returns or raises")

    async def _attempt(self, key: K) -> V:
        if self.timeout is None:
            result: V = await self.parent.query_item(key)
            return result
        with anyio.move_on_after(self.timeout) as scope:
            item: V = await self.parent.query_item(key)
            return item
        assert scope.cancelled_caught
        raise TimeoutError(
            f"no answer for key {key!r} of {type(self.parent).__name__} within "
            f"timeout={self.timeout:g} s"
        )

    def __repr__(self) -> str:
        names = ", ".join(t.__name__ for t in self.on)
        return (
            f"<RetryingDataset of {self.parent!r}: on ({names}), attempts={self.attempts}, "
            f"timeout={self.timeout}>"
        )
