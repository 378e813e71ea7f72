"""Run every workload, each in a process of its own, and print one table.

``python -m benchmarks`` (about 3 minutes) or ``python -m benchmarks --quick``
(under 30 seconds). Ratios are the figures: absolute times on a shared machine
are noise, so every baseline is measured in the same run as our figure. Each
workload starts from a fresh interpreter, so that neither its rates nor its
loop lags depend on the heap (or the imports) a workload before it left.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import platform
import subprocess
import sys
import tempfile
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
    "w10_blocking_view",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, < 30 s")
    parser.add_argument("--only", nargs="*", help="run only these workloads (e.g. w2_io_batches)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _run_one(args.worker, args.quick, args.worker_out)
        return 0
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.only or WORKLOADS:
        t0 = time.perf_counter()
        got = _in_own_process(name, args.quick)
        if got is None:
            continue
        rows.extend(got)
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {'quick' if args.quick else 'full'} run "
        f"in {time.perf_counter() - started:.0f} s"
    )
    print(render(rows))
    return 0


def _run_one(name: str, quick: bool, out: str) -> None:
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"benchmarks.{name}":
            raise
        rows = None  # a workload module that is not there: nothing to report
    else:
        rows = module.run(quick)
    with open(out, "wb") as f:
        pickle.dump(rows, f)


def _in_own_process(name: str, quick: bool) -> list[Row] | None:
    """The rows of workload ``name``, run by a fresh interpreter."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.pickle")
        command = [sys.executable, "-m", "benchmarks", "--worker", name, "--worker-out", out]
        if quick:
            command.append("--quick")
        subprocess.run(command, check=True)
        with open(out, "rb") as f:
            rows: list[Row] | None = pickle.load(f)
    return rows


if __name__ == "__main__":
    sys.exit(main())
