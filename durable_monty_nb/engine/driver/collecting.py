"""The cyclic garbage collector, paused while a driver does a turn's work.

A batched gather creates a few objects per call (its state, task, arguments, row, outcome), all
alive until the run ends. Python's collector runs every 700 new objects and, every so often,
walks the whole heap: in a 100,000-call gather it ran about 2,600 times and took 2.7 s of 14 s,
finding nothing to free. So the driver pauses it for its bulk work (announcing a batched gather,
a commit, a dispatch, collecting a drained batch of outcomes: each bounded by the batch, a commit
by the store's retry window) and lets it run while it waits for Monty or outcomes. Pauses of
several drivers nest (counted); the collector is enabled again only by the last one, and only if
it was enabled before the first (a program that disabled it keeps it disabled).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_paused = 0
_resume = False  # whether the collector was enabled when the first pause began


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block (see the module docstring)."""
    global _paused, _resume
    with _lock:
        if _paused == 0:
            _resume = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _lock:
            _paused -= 1
            if _paused == 0 and _resume:
                gc.enable()
