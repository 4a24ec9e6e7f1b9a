"""The stage process's worker threads yield to its event loop on the CPU.

In ``SCHED_RR`` (the stage as shipped, ``worker.prioritise``) every thread inherits the loop's
real-time priority, and threads of one real-time priority do not preempt each other: when the
Opus encoder and the packager thread both run, on a 2-core machine, the loop's 20 ms timer
waits until one of them blocks or spends its 100 ms round-robin slice. ``below_the_loop``,
called by a worker thread as it starts, drops that thread one real-time priority below the
loop, so the loop's wake-up preempts it at once; the thread still runs ahead of every ordinary
process. Outside a real-time class (niced, or not allowed) it changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading


def below_the_loop() -> None:
    """Lower the calling thread's real-time priority by one (not below 1); no-op otherwise."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        policy = os.sched_getscheduler(tid)
        if policy not in (os.SCHED_RR, os.SCHED_FIFO):
            return
        priority = os.sched_getparam(tid).sched_priority
        if priority > 1:
            os.sched_setscheduler(tid, policy, os.sched_param(priority - 1))
