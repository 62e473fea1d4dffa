"""How often the interpreter switches threads while workflows run.

The driver gives up the GIL whenever it waits: for the Monty worker, for the store, for the
executor's threads. To get it back it waits for the thread holding it, and a notebook function
running pure Python in another thread keeps it until the interpreter forces a switch, every
``sys.getswitchinterval()`` seconds (5 ms by default). A step waits about ten times, so beside one
such call, 200 sequential awaits took 10.8 s instead of 0.2 s (``benchmarks/bench_switching.py``).

While at least one driver of the process runs (and is not parked waiting for signals), the
interval is lowered to :data:`~durable_monty_nb.defaults.SWITCH_INTERVAL` (0.5 ms: the same 200
awaits take 1.1 s), and put back when the last one ends, unless someone changed it meanwhile. The
price: pure-Python work split over several threads switches more often (4 threads: 13% slower
at 0.5 ms, 2% at 1 ms); such functions gain nothing from threads, so run them in processes with
the ``dask`` executor.
"""

from __future__ import annotations

import sys
import threading

from ... import defaults

_lock = threading.Lock()
_interval: float | None = defaults.SWITCH_INTERVAL
_drivers = 0
_saved: float | None = None  # the interval before the first driver lowered it
_lowered: float | None = None  # what it was lowered to (put back only while it is still that)


def set_switch_interval(seconds: float | None) -> None:
    """The interval while workflows run (from the next run on); None leaves Python's alone."""
    global _interval
    if seconds is not None and not 0 < seconds <= 1:
        raise ValueError(f"the switch interval must be between 0 and 1 second, or None; not {seconds!r}")
    _interval = seconds


def driver_started() -> None:
    global _drivers, _saved, _lowered
    with _lock:
        _drivers += 1
        if _drivers == 1 and _interval is not None:
            current = sys.getswitchinterval()
            if _interval < current:
                sys.setswitchinterval(_interval)
                _saved, _lowered = current, sys.getswitchinterval()


def driver_ended() -> None:
    global _drivers, _saved, _lowered
    with _lock:
        _drivers -= 1
        if _drivers == 0 and _lowered is not None:
            if sys.getswitchinterval() == _lowered and _saved is not None:
                sys.setswitchinterval(_saved)
            _saved = _lowered = None
