"""The real driver (Monty, the store, the threads executor) on a settable clock: an hour-long
durable sleep, a signal's timeout and a retry's backoff end when the driver's clock says so, in
milliseconds, and the times the store records are the clock's.

The same waits on the system clock: ``tests/test_engine.py``, ``tests/test_signals.py``,
``tests/test_retry.py``; the components alone: ``tests/test_wait_components.py``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from procs import wait_until

from durable_monty_nb import Engine, retry
from durable_monty_nb.engine.driver.clock import ManualClock


def clocked(engine: Engine) -> ManualClock:
    """Give the engine's next runs a clock that moves only when the test says."""
    clock = ManualClock(time.time())
    engine.settings = dataclasses.replace(engine.settings, clock=clock)
    return clock


def advance(run: Any, clock: ManualClock, seconds: float) -> None:
    """Move the clock and have the driver look again (as its wait would end at the due time)."""
    clock.advance(seconds)
    run._source.wake()


def double(x: int) -> int:
    return 2 * x


def test_an_hour_long_sleep_ends_when_the_clock_says_so(sqlite_engine: Engine) -> None:
    clock = clocked(sqlite_engine)
    start = clock.now()
    code = "import asyncio\nawait asyncio.sleep(3600)\nawait double(2)"
    run = sqlite_engine.start(code, {"double": double}, key="clocked-sleep")
    wait_until(lambda: [c.status for c in run.calls()] == ["waiting"], what="the sleep")
    advance(run, clock, 3600)
    assert run.result(timeout=30) == 4
    (sleep,) = [c for c in sqlite_engine.store.load_calls(run.execution_id) if c.kind == "sleep"]
    assert sleep.due_at == start + 3600 and sleep.finished_at == start + 3600


def test_a_signal_timeout_is_a_deadline_on_the_clock(sqlite_engine: Engine) -> None:
    clock = clocked(sqlite_engine)
    start = clock.now()
    code = (
        "try:\n    answer = await signal('approval', timeout=86400)\nexcept TimeoutError as e:\n    answer = str(e)\n"
    )
    code += "answer"
    run = sqlite_engine.start(code, {}, key="clocked-signal")
    wait_until(lambda: [w.name for w in run.waits()] == ["approval"], what="the signal wait")
    assert run.waits()[0].due_at == start + 86400
    advance(run, clock, 86400)
    assert run.result(timeout=30) == "no signal 'approval' arrived within 86400 s"


def test_a_retry_backoff_of_an_hour_runs_again_when_the_clock_reaches_it(sqlite_engine: Engine) -> None:
    clock = clocked(sqlite_engine)
    start = clock.now()
    tries: list[float] = []

    @retry(retries=1, backoff="constant", delay=3600, max_delay=3600)
    def flaky(x: int) -> int:
        tries.append(clock.now())
        if len(tries) == 1:
            raise ConnectionError("down")
        return x

    run = sqlite_engine.start("await flaky(5)", {"flaky": flaky}, key="clocked-retry")
    store = sqlite_engine.store
    wait_until(lambda: [c.status for c in store.load_calls(run.execution_id)] == ["retrying"], what="the failure")
    (row,) = store.load_calls(run.execution_id)
    assert row.due_at == start + 3600  # failed at the start: the clock had not moved
    advance(run, clock, 3600)
    assert run.result(timeout=30) == 5
    assert tries == [start, start + 3600]
