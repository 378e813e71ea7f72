"""The ``info``, ``verify`` and ``convert`` commands, for PickledDataset files.

>>> import os, tempfile, asyncio
>>> from mlworkflow_async import DictDataset, PickledDataset
>>> path = os.path.join(tempfile.mkdtemp(), "d.pkl")
>>> _ = asyncio.run(PickledDataset.create(DictDataset({"a": 1, "b": 2}), path))
>>> from mlworkflow_async.__main__ import main
>>> main(["verify", path])  # doctest: +ELLIPSIS
OK: all 2 items of .../d.pkl are readable
0
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from typing import Any

__all__ = ["add_file_commands"]

_SHOWN_KEYS = 5
_VERIFY_BATCH = 64


def _safe_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--safe",
        action="store_true",
        help="unpickle with the restricted loader: builtins and numpy arrays and scalars of "
        "plain dtypes only, for files you do not trust (slower)",
    )


def add_file_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``info``, ``verify`` and ``convert`` on the main parser."""
    info = subparsers.add_parser("info", help="describe a PickledDataset file")
    info.add_argument("file")
    _safe_flag(info)
    info.set_defaults(run=_info)

    verify = subparsers.add_parser(
        "verify", help="read every item of a PickledDataset file, checking every byte of a "
        "format 2 file against its checksums; exit 1 at the first broken one"
    )
    verify.add_argument("file")
    _safe_flag(verify)
    verify.set_defaults(run=_verify)

    convert = subparsers.add_parser(
        "convert", help="rewrite a PickledDataset file (e.g. of the original mlworkflow) "
        "in the current format, atomically"
    )
    convert.add_argument("old")
    convert.add_argument("new")
    _safe_flag(convert)
    convert.add_argument("--progress", action="store_true", help="show a progress bar")
    convert.set_defaults(run=_convert)


def _open(path: str, safe: bool) -> Any:
    from ..exceptions import PickledFileError
    from ._pickled import PickledDataset

    try:
        return PickledDataset(path, safe=safe)
    except (PickledFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _describe_format(version: int, short: bool = False) -> str:
    if version == 0:
        if short:
            return "the original mlworkflow format"
        return "original mlworkflow (legacy; `convert` rewrites it in the current format)"
    if version == 1:
        return "mlworkflow-async, format version 1 (`convert` rewrites it in format 2)"
    return f"mlworkflow-async, format version {version}"


def _describe_checks(ds: Any) -> str:
    from ._checksum import NAMES

    index = ds._index
    footer = getattr(index, "footer", None)
    if footer is None:
        return "none (only the index of format 1; `convert` adds checksums of every byte)"
    return f"{NAMES[footer.algorithm]} of every item, of the index and of the header"


def _info(args: argparse.Namespace) -> int:
    ds = _open(args.file, args.safe)
    if ds is None:
        return 1
    with ds:
        keys = ds.yield_keys()
        shown = ", ".join(repr(key) for key in itertools.islice(keys, _SHOWN_KEYS))
        more = f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
        print(f"file:    {ds.path}")
        print(f"format:  {_describe_format(ds.format_version)}")
        print(f"checks:  {_describe_checks(ds)}")
        print(f"items:   {len(keys)}")
        print(f"size:    {ds.file_size:,} bytes")
        print(f"keys:    {shown}{more}")
        print(f"context: {ds.context!r}")
    return 0


async def _first_broken(ds: Any) -> tuple[Any, BaseException] | None:
    keys = ds.yield_keys()
    for start in range(0, len(keys), _VERIFY_BATCH):
        chunk = keys[start:start + _VERIFY_BATCH]
        try:
            await ds.query_items(chunk)
        except Exception:
            # Find which item it was, in key order.
            for key in chunk:
                try:
                    await ds.query_item(key)
                except Exception as exc:
                    return key, exc
    return None


def _verify(args: argparse.Namespace) -> int:
    ds = _open(args.file, args.safe)
    if ds is None:
        return 1
    with ds:
        check_all = getattr(ds._index, "check_all", None)
        if check_all is not None:  # format 2: every block of the index, then every item
            from ..exceptions import PickledFileError

            try:
                check_all()
                ds.yield_keys()
            except PickledFileError as damaged:
                print(f"BROKEN: the index: {damaged}")
                return 1
        broken = asyncio.run(_first_broken(ds))
        if broken is not None:
            key, error = broken
            print(f"BROKEN: item {key!r}: {error}")
            return 1
        print(f"OK: all {len(ds)} items of {ds.path} are readable")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..exceptions import PickledFileError, UnpicklableItemError
    from ._pickled import PickledDataset

    ds = _open(args.old, args.safe)
    if ds is None:
        return 1
    with ds:
        try:
            count = asyncio.run(PickledDataset.create(ds, args.new, progress=args.progress))
        except (PickledFileError, UnpicklableItemError, OSError) as exc:
            print(f"error: {exc}; {args.new} was left as it was", file=sys.stderr)
            return 1
        print(f"converted {count} items from {_describe_format(ds.format_version, True)} "
              f"to {args.new}")
    return 0
