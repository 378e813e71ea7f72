"""Run every workload in one process and print one table.

``python -m benchmarks`` (about 3 minutes) or ``python -m benchmarks --quick``
(under 30 seconds). Ratios are the figures: absolute times on a shared machine
are noise, so every baseline is measured in the same run as our figure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

from ._table import Row, render

WORKLOADS = [
    "w1_chain",
    "w1b_torch_chain",
    "w2_io_batches",
    "w3_pickled_reads",
    "w4_pickled_create",
    "w4b_create_subclass",
    "w5_loop_lag",
    "w5b_collate_lag",
    "w6_side_runner",
    "w7_format2",
    "w_cpu_stages",
    "w8_epochs",
    "w_sharded",
    "w_remote",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, < 30 s")
    parser.add_argument("--only", nargs="*", help="run only these workloads (e.g. w2_io_batches)")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.only or WORKLOADS:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.{name}":
                raise
            continue
        t0 = time.perf_counter()
        rows.extend(module.run(args.quick))
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {'quick' if args.quick else 'full'} run "
        f"in {time.perf_counter() - started:.0f} s"
    )
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
