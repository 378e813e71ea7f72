"""Command line: ``python -m mlworkflow_async COMMAND``.

Commands: ``demo`` (a small concurrent pipeline on generated data), and the
file tools ``info``, ``verify`` and ``convert`` for PickledDataset files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._store._cli import add_file_commands


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("demo", help="run a small pipeline on generated data")
    parser.add_argument("--items", type=int, default=2000, help="number of generated items")

    def run(args: argparse.Namespace) -> int:
        from ._demo import main

        return main(items=args.items)

    parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlworkflow_async",
        description="Async-first datasets for machine-learning data pipelines.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(subparsers)
    add_file_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
