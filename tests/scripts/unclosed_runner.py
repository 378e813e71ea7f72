"""Runners that are never closed: their work still runs, and failures are reported at exit."""

import sys
import time

from mlworkflow_async.sync import SideRunner


def slow(i):
    time.sleep(0.05)
    sys.stdout.write(f"done {i}\n")  # one write: lines from threads stay whole
    sys.stdout.flush()


def fail():
    raise ValueError("failure nobody collected")


runner = SideRunner(3)
for i in range(6):
    runner.do(slow, i)
runner.do(fail)

def say(line):
    sys.stdout.write(line + "\n")  # one write: lines from threads stay whole
    sys.stdout.flush()


# Dropped at once: its work must run all the same.
SideRunner(1).do(say, "dropped runner's work ran")

say("end of script")
