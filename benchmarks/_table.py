"""Rows of the benchmark table and how they are printed."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Row:
    """One line of the table: our figure against a baseline measured in the same run.

    ``higher_is_better`` says which way the ratio should go; ``target`` is the
    ratio to reach (ours / baseline, or baseline / ours when lower is better).
    """

    workload: str
    unit: str
    ours: float
    baseline: float
    baseline_name: str
    target: float | None
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.ours / self.baseline if self.baseline else float("inf")
        return self.baseline / self.ours if self.ours else float("inf")

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        if round(self.ratio, 2) >= self.target:
            return "met"
        return f"NOT met ({self.ratio / self.target:.0%} of target)"


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def render(rows: list[Row]) -> str:
    header = ["workload", "ours", "baseline", "ratio", "target", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        target = "-" if r.target is None else f">= {r.target:g}x"
        ours = f"{fmt(r.ours)} {r.unit}"
        base = f"{fmt(r.baseline)} {r.unit} ({r.baseline_name})"
        workload = r.workload + (f" [{r.note}]" if r.note else "")
        cells = [workload, ours, base, f"{r.ratio:.2f}x", target, r.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_of(repeats: int, measure: Callable[[], float]) -> float:
    """The best of ``repeats`` throughput measurements (noise only slows things down)."""
    return max(measure() for _ in range(repeats))


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``.

    With ``cpu=True`` it counts the CPU time of the whole process (every
    thread) instead of wall time: for CPU-bound work on a shared machine this
    is the figure other processes cannot inflate.
    """

    def __init__(self, cpu: bool = False) -> None:
        self._clock = time.process_time if cpu else time.perf_counter

    def __enter__(self) -> Timer:
        if self._clock is time.process_time:
            # A CPU-bound section starts from a collected heap, so that a full
            # collection owed to what ran before is not charged to it. (Wall
            # timers skip it: some time microseconds, or run beside a lag probe.)
            gc.collect()
        self._start = self._clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self._clock() - self._start
