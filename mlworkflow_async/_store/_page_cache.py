"""Asking the kernel whether file pages are in memory, and to bring them in.

``cachestat`` (Linux 6.5+; ``mincore`` on a mapping before that) tells
whether pages are in the page cache; ``madvise(..., MADV_POPULATE_READ)``
(Linux 5.14+) reads them in and maps them, so that touching them later does
not fault. Both are called through ctypes: unlike
``mmap.madvise``, a foreign call releases the GIL, so a worker thread
waiting for the disk does not stall the event loop.

Where these calls are unavailable, :data:`AVAILABLE` is False.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["AVAILABLE", "PAGE", "cached", "populate", "resident"]

PAGE = mmap.PAGESIZE
_POPULATE_READ: int = getattr(mmap, "MADV_POPULATE_READ", 22)


_CACHESTAT = 451  # the same syscall number on every Linux architecture


def _load() -> tuple[Callable[..., int], Callable[..., int], Any, Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore, syscall = libc.madvise, libc.mincore, libc.syscall
    except (ImportError, OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    mincore.restype = ctypes.c_int
    syscall.restype = ctypes.c_long

    class Range(ctypes.Structure):
        _fields_ = (("offset", ctypes.c_uint64), ("length", ctypes.c_uint64))

    class Stat(ctypes.Structure):
        _fields_ = tuple(
            (name, ctypes.c_uint64)
            for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
        )

    def cachestat(fd: int, start: int, length: int) -> int | None:
        """Pages of ``[start, start + length)`` in the page cache; None if unknown."""
        stat = Stat()
        if syscall(_CACHESTAT, fd, ctypes.byref(Range(start, length)), ctypes.byref(stat), 0):
            return None
        return int(stat.cache)

    return madvise, mincore, ctypes.get_errno, cachestat


_FUNCTIONS = _load()
AVAILABLE = _FUNCTIONS is not None
_cachestat_works = AVAILABLE


def _span(mapping: mmap.mmap, start: int, length: int) -> tuple[int, int]:
    """The page-aligned address and length covering ``[start, start + length)``."""
    address: int = np.frombuffer(mapping, dtype=np.uint8).__array_interface__["data"][0]
    skip = start % PAGE
    return address + start - skip, length + skip


def _fail(get_errno: Any) -> OSError:
    code = get_errno()
    return OSError(code, os.strerror(code))


def populate(mapping: mmap.mmap, start: int, length: int) -> None:
    """Read in and map bytes ``[start, start + length)`` of ``mapping``.

    Raises ``OSError``: ``EINVAL`` where the kernel cannot, ``EFAULT`` when
    the range lies past the end of the file (touching it would ``SIGBUS``).
    """
    assert _FUNCTIONS is not None
    madvise, _, get_errno, _ = _FUNCTIONS
    address, size = _span(mapping, start, length)
    if madvise(address, size, _POPULATE_READ) != 0:
        raise _fail(get_errno)


def resident(mapping: mmap.mmap, start: int, length: int) -> bool:
    """Whether every page of ``[start, start + length)`` of ``mapping`` is in memory."""
    assert _FUNCTIONS is not None
    _, mincore, get_errno, _ = _FUNCTIONS
    address, size = _span(mapping, start, length)
    pages = np.empty((size + PAGE - 1) // PAGE, dtype=np.uint8)
    if mincore(address, size, pages.ctypes.data) != 0:
        raise _fail(get_errno)
    return bool(np.bitwise_and(pages, 1).all())


def cached(fd: int, start: int, length: int) -> bool | None:
    """Whether bytes ``[start, start + length)`` of a file are all in the page cache.

    One cheap system call; None where the kernel cannot say (before 6.5).
    """
    global _cachestat_works
    if not _cachestat_works:
        return None
    assert _FUNCTIONS is not None
    count = _FUNCTIONS[3](fd, start, length)
    if count is None:
        _cachestat_works = False
        return None
    return bool(count >= (start + length - 1) // PAGE - start // PAGE + 1)
