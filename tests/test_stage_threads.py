"""``stage/threads.below_the_loop``: a stage worker thread one real-time priority below its
event loop (in a child process, so this one's scheduling is left alone)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import os, threading
from townhall.stage.threads import below_the_loop
if {realtime}:
    os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
seen = {{}}
def run():
    below_the_loop()
    tid = threading.get_native_id()
    seen["thread"] = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority)
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(seen["thread"], (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority))
"""


def child(realtime: bool) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(realtime=realtime)], capture_output=True, text=True, timeout=30
    )
    if realtime and "Operation not permitted" in done.stderr:
        pytest.skip("this machine does not allow SCHED_RR")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_worker_thread_yields_to_the_real_time_loop() -> None:
    assert child(True) == f"({os.SCHED_RR}, 9) ({os.SCHED_RR}, 10)"


def test_outside_a_real_time_class_nothing_changes() -> None:
    assert child(False) == f"({os.SCHED_OTHER}, 0) ({os.SCHED_OTHER}, 0)"


def test_one_source_for_the_priorities() -> None:
    """The stage process, its worker threads and the node's guard take them from one place."""
    from townhall.stage import pool, threads, worker

    assert threads.worker_priority(threads.REALTIME_PRIORITY) == threads.REALTIME_PRIORITY - 1 == 9
    assert threads.worker_priority(1) == 1  # never out of the real-time range
    assert worker.REALTIME_PRIORITY is pool.REALTIME_PRIORITY is threads.REALTIME_PRIORITY
    assert worker.NICE is pool.NICE is threads.NICE
