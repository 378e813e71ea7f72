"""Recycled memory for batches read into place.

A fresh 64 MB buffer per batch costs its page faults as it is filled: reading
into it runs at about 60% of the speed of reading into memory already
touched (benchmark W7). :class:`BatchBuffers` hands out arrays over
buffers it keeps, and takes a buffer back once nothing views its array.

That moment is known exactly: the array handed out is made by
``numpy.frombuffer`` over a ``memoryview``, so every view of it, however
derived (slices, reshapes, ``.view()``), keeps that array alive, never the
buffer directly; its ``weakref.finalize`` runs when the last view is gone.

>>> pool = BatchBuffers(keep=1)
>>> a = pool.take(8)
>>> address = a.ctypes.data
>>> del a  # the buffer goes back to the pool...
>>> pool.take(8).ctypes.data == address  # ...and serves the next batch
True
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

__all__ = ["BatchBuffers"]


class BatchBuffers:
    """At most ``keep`` spare buffers of each size, and at most ``limit`` bytes of them."""

    def __init__(self, keep: int = 2, limit: int = 512 << 20) -> None:
        self.keep = keep
        self.limit = limit
        self._spare: dict[int, list[np.ndarray[Any, Any]]] = {}
        self._held = 0
        # finalize() callbacks run in whichever thread drops the last view.
        self._lock = threading.Lock()
        self._closed = False

    def take(self, nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """A writable uint8 array of ``nbytes``, over a recycled buffer when one is spare."""
        with self._lock:
            spare = self._spare.get(nbytes)
            raw = spare.pop() if spare else None
            if raw is not None:
                self._held -= nbytes
        if raw is None:
            raw = np.empty(nbytes, np.uint8)
        array: np.ndarray[Any, np.dtype[np.uint8]] = np.frombuffer(raw.data, np.uint8)
        weakref.finalize(array, self._give_back, raw)
        return array

    def _give_back(self, raw: np.ndarray[Any, Any]) -> None:
        nbytes = raw.nbytes
        with self._lock:
            if self._closed or self._held + nbytes > self.limit:
                return
            spare = self._spare.setdefault(nbytes, [])
            if len(spare) < self.keep:
                spare.append(raw)
                self._held += nbytes

    def close(self) -> None:
        """Keep nothing more: buffers in use are freed with their last view."""
        with self._lock:
            self._closed = True
            self._spare.clear()
            self._held = 0
