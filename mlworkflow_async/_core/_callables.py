"""Helpers that let users pass plain functions or ``async def`` functions alike."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any


def is_async_callable(f: object) -> bool:
    """True when calling ``f`` returns an awaitable by construction."""
    while isinstance(f, functools.partial):
        f = f.func
    if inspect.iscoroutinefunction(f):
        return True
    call = getattr(type(f), "__call__", None)  # noqa: B004 - callable instances
    return call is not None and inspect.iscoroutinefunction(call)


def positional_arity(f: Callable[..., Any]) -> int | None:
    """Number of positional parameters ``f`` takes, or ``None`` for ``*args``."""
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return None
    count = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            count += 1
    return count


def describe(f: object) -> str:
    """A short human name for a callable, for error messages."""
    return getattr(f, "__qualname__", None) or repr(f)
