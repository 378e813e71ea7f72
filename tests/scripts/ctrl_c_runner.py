"""Hand a runner of 2 twenty slow calls, then wait; the test presses Ctrl-C.

Usage: ctrl_c_runner.py sync|async

Each call prints ``start N`` and then works in small steps, checking for
cancellation between them; it prints ``end N`` only if it is allowed to
finish. After Ctrl-C, no further call may start and none may end.
"""

import asyncio
import signal
import sys
import time

import anyio.from_thread

from mlworkflow_async import SideRunner as AsyncSideRunner
from mlworkflow_async.sync import SideRunner


def say(line):
    sys.stdout.write(line + "\n")  # one write: lines from threads stay whole
    sys.stdout.flush()


def work(i):
    say(f"start {i}")
    for _ in range(2000):
        anyio.from_thread.check_cancelled()
        time.sleep(0.01)
    say(f"end {i}")


def blocking():
    runner = SideRunner(2)
    for i in range(20):
        runner.run_async(work, i)
    say("waiting")
    runner.collect_runs()


async def main():
    async with AsyncSideRunner(2) as runner:
        for i in range(20):
            runner.run_async(work, i)
        say("waiting")
        await runner.collect_runs()


# Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the parent
# started us with SIGINT ignored (as shells do for background jobs).
signal.signal(signal.SIGINT, signal.default_int_handler)

if sys.argv[1] == "sync":
    blocking()
else:
    asyncio.run(main())
