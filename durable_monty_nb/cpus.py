"""One CPU shared by threads and processes that take turns (Linux; elsewhere nothing happens).

A driver and its Monty session never run at once: the driver sends a turn and waits; the
pool's I/O threads pass it to the worker process, which runs it and answers. Left to the
scheduler, each of those hand-offs (four a turn, three turns a sequential step) wakes another,
idle CPU, and on a virtual machine such a wake-up costs tens of microseconds. On one CPU each
hand-off is a context switch instead (1,000 bare Monty steps: 0.21 to 0.25 s apart, 0.04 s on
one CPU, measured on a 2-core VM).

Pinning is inherited by threads a pinned thread starts, so a thread that runs user code and
may be started by a driver calls :func:`unpin_this_thread` first (hook threads), or before each
call it runs: the threads executor's threads wait for work on the driver's CPU
(:func:`home_of_this_thread`, :func:`pin_this_thread`), so the driver wakes them, and they wake
it, with a context switch rather than a wake-up of the other CPU (a sequential step: 135 to 55 µs
for the two hand-offs), and each call runs with every CPU. Only one driver of a process shares
a CPU at a time: the pool's I/O threads serve every session, and two drivers pinned to one CPU
would lose the parallelism of their Monty workers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable

SUPPORTED = hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")

_lock = threading.Lock()
_sharing = False
_allowed: set[int] | None = None  # the CPUs the process may use, read before the first pin


def threads_of(pid: int, name: str | None = None) -> list[int]:
    """The thread ids of process ``pid`` (those named ``name`` only, when given)."""
    found = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            if name is not None:
                try:
                    with open(f"/proc/{pid}/task/{tid}/comm") as handle:
                        if handle.read().strip() != name:
                            continue
                except OSError:  # the thread ended meanwhile
                    continue
            found.append(int(tid))
    return found


def share_one_cpu(thread_ids: Iterable[int]) -> Callable[[], None] | None:
    """Pin ``thread_ids`` (any process's) to one CPU of the process's set; return the function
    that gives them every CPU back. None: nothing pinned (not Linux, one CPU, or another driver
    of the process shares one now)."""
    global _sharing, _allowed
    if not SUPPORTED:
        return None
    with _lock:
        if _sharing:
            return None
        if _allowed is None:
            _allowed = set(os.sched_getaffinity(0))
        if len(_allowed) < 2:
            return None
        _sharing = True
    allowed, tids = _allowed, list(thread_ids)
    # The last CPU: on this project's 2-core VM, where the disk's interrupts arrive at CPU 1,
    # a step's fsync'ed commit took 30 to 90 us less there than on CPU 0.
    _set(tids, {max(allowed)})

    def release() -> None:
        global _sharing
        _set(tids, allowed)
        with _lock:
            _sharing = False

    return release


def unpin_this_thread() -> None:
    """Give the calling thread every CPU of the process (it may have inherited a driver's pin)."""
    if _allowed is not None:
        _set([0], _allowed)  # 0: the calling thread


def home_of_this_thread() -> set[int] | None:
    """The CPUs of the calling thread when it inherited a pin (a sharing driver started it);
    None when it has every CPU of the process, or nothing was ever pinned."""
    if _allowed is None:
        return None
    with contextlib.suppress(OSError):
        home = set(os.sched_getaffinity(0))
        if home != _allowed:
            return home
    return None


def pin_this_thread(home: set[int]) -> None:
    """Put the calling thread back on ``home`` (see :func:`home_of_this_thread`)."""
    _set([0], home)


def unpin(thread_ids: Iterable[int]) -> None:
    """Give ``thread_ids`` every CPU of the process, if anything was ever pinned (a process
    started by a pinned thread, e.g. a Monty worker the pool spawned meanwhile, is pinned too)."""
    if _allowed is not None:
        _set(list(thread_ids), _allowed)


def _set(tids: list[int], cpus: set[int]) -> None:
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread or process that ended meanwhile
            os.sched_setaffinity(tid, cpus)
