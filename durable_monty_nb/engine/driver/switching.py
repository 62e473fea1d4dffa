"""How often the interpreter switches threads while workflows run.

The driver gives up the GIL whenever it waits: for the Monty worker, for the store, for the
executor's threads. To get it back it waits for the thread holding it, and a notebook function
running pure Python in another thread keeps it until the interpreter forces a switch, every
``sys.getswitchinterval()`` seconds (5 ms by default). A step waits about ten times, so beside one
such call, 200 sequential awaits took 10.8 s instead of 0.2 s (``benchmarks/bench_switching.py``).

A driver notices this when a round trip to Monty that takes about 0.1 ms took more than
:data:`CONTENDED` (one announce per step is timed). From then until no driver of the process is
running (finished, or parked waiting for signals), the interval is lowered to
:data:`~durable_monty_nb.defaults.SWITCH_INTERVAL` (0.5 ms: the same 200 awaits take 1.1 s), then
put back, unless someone changed it meanwhile. It is lowered only on that evidence: lowered for
every run, it made runs of trivial calls on 32 threads 7 to 8% slower (more forced switches among
them). Where it is lowered, pure-Python work split over several threads pays for the more
frequent switches (4 threads: up to 13% slower at 0.5 ms); such functions gain nothing from threads:
run them in processes (``dask``).
"""

from __future__ import annotations

import sys
import threading

from ... import defaults

CONTENDED = 0.001
"""Seconds a Monty round trip of an announced call may take before the driver concludes that
another thread keeps the GIL from it (uncontended: about 0.1 ms on a 2-core VM)."""

_lock = threading.Lock()
_interval: float | None = defaults.SWITCH_INTERVAL
_running = 0  # drivers running (not parked)
_saved: float | None = None  # the interval before it was lowered
_lowered: float | None = None  # what it was lowered to (put back only while it is still that)
lowered = False  # read without the lock by drivers, to time nothing more once it is lowered


def check_switch_interval(seconds: float | None) -> None:
    if seconds is not None and not 0 < seconds <= 1:
        raise ValueError(f"the switch interval must be between 0 and 1 second, or None; not {seconds!r}")


def set_switch_interval(seconds: float | None) -> None:
    """The interval while workflows run beside a busy thread; None leaves Python's alone."""
    global _interval
    check_switch_interval(seconds)
    _interval = seconds


def driver_running() -> None:
    """A driver starts running (or stops being parked)."""
    global _running
    with _lock:
        _running += 1


def driver_stopped() -> None:
    """A driver ends (or parks); when none runs any more, the interval is put back."""
    global _running, _saved, _lowered, lowered
    with _lock:
        _running -= 1
        if _running == 0 and lowered:
            if sys.getswitchinterval() == _lowered and _saved is not None:
                sys.setswitchinterval(_saved)
            _saved = _lowered = None
            lowered = False


def contention_seen() -> None:
    """A running driver waited for the GIL: lower the interval until no driver runs."""
    global _saved, _lowered, lowered
    with _lock:
        if lowered or _running == 0:
            return
        lowered = True
        current = sys.getswitchinterval()
        if _interval is not None and _interval < current:
            sys.setswitchinterval(_interval)
            _saved, _lowered = current, sys.getswitchinterval()
