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


def takes_keyword(method: Callable[..., Any], name: str) -> bool:
    """Whether ``method`` can be called with the keyword argument ``name``."""
    function = getattr(method, "__func__", method)
    try:
        return _takes_keyword(function, name)
    except TypeError:  # an unhashable callable: not cached
        return _takes_keyword.__wrapped__(function, name)


@functools.cache
def _takes_keyword(function: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    found = parameters.get(name)
    if found is not None:
        return found.kind in (found.POSITIONAL_OR_KEYWORD, found.KEYWORD_ONLY)
    return any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def describe(f: object) -> str:
    """A short human name for a callable, for error messages."""
    return getattr(f, "__qualname__", None) or repr(f)
