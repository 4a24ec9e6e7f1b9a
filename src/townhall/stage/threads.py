"""The stage process's worker threads yield to its event loop on the CPU.

In ``SCHED_RR`` (the stage as shipped, ``worker.prioritise``) every thread inherits the loop's
real-time priority, and threads of one real-time priority do not preempt each other: when the
Opus encoder and the packager thread both run, on a 2-core machine, the loop's 20 ms timer
waits until one of them blocks or spends its 100 ms round-robin slice. ``below_the_loop``,
called by a worker thread as it starts, drops that thread one real-time priority below the
loop, so the loop's wake-up preempts it at once; the thread still runs ahead of every ordinary
process. Outside a real-time class (niced, or not allowed) it changes nothing.

The priorities live here, once: ``worker.prioritise`` puts the stage process at
``REALTIME_PRIORITY`` (or ``NICE``), ``below_the_loop`` puts a worker at ``worker_priority`` of
its loop, and the node's real-time guard (``pool.schedule``) restores both after it demoted the
process. This module imports nothing heavy, so the node's side can use it (``worker`` pulls in
aiortc).
"""

from __future__ import annotations

import contextlib
import os
import threading

NICE = -5  # the stage process outside SCHED_RR: ahead of the node's HTTP process when allowed
REALTIME_PRIORITY = 10  # the stage's event loop in SCHED_RR, low among real-time priorities
WORKER_BELOW = 1  # a worker thread runs this many real-time priorities below its loop


def worker_priority(loop: int = REALTIME_PRIORITY) -> int:
    """The real-time priority of a worker thread under a loop at ``loop`` (not below 1)."""
    return max(1, loop - WORKER_BELOW)


def below_the_loop() -> None:
    """Lower the calling thread's real-time priority to ``worker_priority`` of what it inherited
    from the loop that started it; no-op outside a real-time class."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        policy = os.sched_getscheduler(tid)
        if policy not in (os.SCHED_RR, os.SCHED_FIFO):
            return
        priority = os.sched_getparam(tid).sched_priority
        if worker_priority(priority) != priority:
            os.sched_setscheduler(tid, policy, os.sched_param(worker_priority(priority)))
