"""What ``%load_ext`` starts in the background, so the first ``%%durable`` cell does not pay for it.

One daemon thread per process: it starts the Monty pool and runs its first worker once
(``sandbox``), then runs a two-call workflow on a store in memory, with a key of its own, so the
code a first run takes (SQL compiled for SQLite, the driver's and executor's paths, the gather
rewrite) has run once. A run that began before that workflow (a notebook run top to bottom)
takes those paths itself: the workflow is skipped rather than run beside it, the two taking
turns at the GIL for the same work. It writes no file and shows nothing; a failure is left for
the first cell to meet and report.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..executors import Threads
from . import sandbox

_lock = threading.Lock()
_warming: threading.Thread | None = None
_run_began = threading.Event()
failure: BaseException | None = None  # why the warm-up workflow failed (kept for tests and bug reports)
ran = False  # the warm-up workflow ran and gave its result

WORKFLOW = "await gather(*[double(i) for i in range(2)]) + [await double(2)]"
SECRET = "durable-monty-nb warm-up"  # an in-memory store's: signs nothing that lasts


def warm_up() -> threading.Thread:
    """Start the warm-up thread (once per process); return it."""
    global _warming
    with _lock:
        if _warming is None:
            _warming = threading.Thread(target=_warm, name="durable-warm-up", daemon=True)
            _warming.start()
        return _warming


def run_began() -> None:
    """A user's run starts (``%%durable``, ``%durable_resume``): a warm-up workflow not started
    yet is skipped."""
    _run_began.set()


def _warm() -> None:
    global failure, ran
    sandbox.warm()
    if _run_began.is_set():
        return
    try:
        from .engine import Engine

        engine = Engine("sqlite://", executor=_Threads(workers=2), secret=SECRET, retention=None)
        try:
            if engine.run(WORKFLOW, {"double": _double}, key="warm-up") != [0, 2, 4]:
                raise AssertionError("the warm-up workflow returned a wrong result")
            ran = True
        finally:
            engine.close()
    except Exception as exc:  # the first cell meets whatever this is, and reports it
        failure = exc


def _double(i: int) -> int:
    return i * 2


@dataclass(frozen=True)
class _Threads(Threads):
    """The threads executor, whose driver leaves the CPUs alone: a user's run started meanwhile
    shares one with its Monty worker instead (one driver of a process does, see ``cpus``)."""

    def open(self, run: Any) -> Any:
        executor = super().open(run)
        executor.pin_safe = False
        return executor
