"""Call controls: timeouts, concurrency limits, start rates and RetryAfter, on real threads.

Time-dependent assertions check order and bounds with margins, never exact durations.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from procs import wait_until

from durable_monty_nb import Engine, RetryAfter, WorkflowFailed, limits, retry
from durable_monty_nb.engine.controls import Rate


@pytest.fixture
def engine(sqlite_engine: Engine) -> Engine:
    return sqlite_engine  # conftest's: runs still active at the end are interrupted


# -- timeouts ------------------------------------------------------------------------------------


def test_a_hung_call_times_out_is_caught_and_does_not_block_the_pool(engine: Engine) -> None:
    release = threading.Event()
    finished: list[str] = []

    @limits(timeout=0.3)
    def hang(x):
        release.wait(60)  # a call that hangs: its thread cannot be killed
        finished.append("hang")
        return x

    def quick(x):
        return x * 2

    code = """
try:
    await hang(1)
    outcome = "finished"
except TimeoutError as e:
    outcome = str(e)
rest = await gather(*[quick(i) for i in range(5)])
[outcome, rest]
"""
    # One thread only: the calls after the timeout run on the thread that replaced the stuck one.
    outcome, rest = engine.run(code, {"hang": hang, "quick": quick}, key="hang", workers=1)
    assert "hang() did not finish within 0.3 s" in outcome
    assert rest == [0, 2, 4, 6, 8]
    assert finished == []  # the cell did not wait for the hung call
    release.set()


def test_time_waiting_for_a_thread_does_not_count_against_a_timeout(engine: Engine) -> None:
    started = threading.Event()
    release = threading.Event()

    def hold(x):  # no timeout: it keeps the only thread while the timed call waits behind it
        started.set()
        release.wait(60)
        return x

    @limits(timeout=1)
    def quick(x):
        return x + 1

    run = engine.start("await gather(hold(1), quick(2))", {"hold": hold, "quick": quick}, key="queued", workers=1)
    assert started.wait(30)
    time.sleep(1.5)  # the scenario itself: quick() has waited longer than its timeout, never having run
    release.set()
    assert run.result(60) == [1, 3]  # its one-second budget starts when it starts


def test_an_async_call_is_cancelled_at_its_deadline(engine: Engine) -> None:
    seen: list[str] = []

    async def slow(x):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return x

    code = "try:\n    await slow(1)\nexcept TimeoutError as e:\n    r = str(e)\nr"
    assert "slow() did not finish within 0.2 s" in engine.run(code, {"slow": slow}, key="slow", timeout=0.2)
    wait_until(lambda: seen == ["cancelled"], what="the coroutine to be cancelled")


def test_timeouts_inside_gather_are_retried_by_the_policy_then_succeed(engine: Engine) -> None:
    release = threading.Event()
    starts: dict[int, int] = {}
    lock = threading.Lock()

    @retry(retries=2, backoff="constant", delay=0)
    @limits(timeout=0.3)
    def sometimes_slow(x):
        with lock:
            starts[x] = starts.get(x, 0) + 1
            attempt = starts[x]
        if x == 3 and attempt < 3:
            release.wait(60)  # the first two attempts of call 3 hang
        return x

    code = "sum(await gather(*[sometimes_slow(i) for i in range(6)]))"
    run = engine.start(code, {"sometimes_slow": sometimes_slow}, key="retried")
    assert run.result(60) == 15
    assert starts == {0: 1, 1: 1, 2: 1, 3: 3, 4: 1, 5: 1}
    (call_3,) = [c for c in run.calls() if c.args == "3"]
    assert call_3.attempts == 3 and call_3.status == "done"
    release.set()


def test_an_uncaught_timeout_fails_the_run_naming_the_function(engine: Engine) -> None:
    release = threading.Event()

    def stuck(x):
        release.wait(60)
        return x

    with pytest.raises(WorkflowFailed) as failure:
        engine.run("await stuck(1)", {"stuck": stuck}, key="stuck", timeout=0.2)
    assert failure.value.error_type == "TimeoutError"
    assert "stuck() did not finish within 0.2 s" in str(failure.value)
    release.set()


# -- concurrency ---------------------------------------------------------------------------------


class Peak:
    """Counts calls inside a function at once, and the highest count seen."""

    def __init__(self) -> None:
        self.inside = self.peak = 0
        self.lock = threading.Lock()
        self.calls = 0

    def enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.calls += 1
            self.peak = max(self.peak, self.inside)

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1


def test_concurrency_is_limited_across_two_runs_of_the_process(engine: Engine) -> None:
    peak = Peak()

    @limits(concurrency=2)
    def train(x):
        peak.enter()
        time.sleep(0.02)  # the work of a call (not a synchronization)
        peak.leave()
        return x

    code = "sum(await gather(*[train(i) for i in range(12)]))"
    first = engine.start(code, {"train": train}, key="gpu-a")
    second = engine.start(code, {"train": train}, key="gpu-b")
    assert first.result(60) == second.result(60) == 66
    assert peak.calls == 24
    assert peak.peak <= 2


def test_calls_waiting_for_a_slot_are_shown_apart_from_queued_ones(engine: Engine) -> None:
    release = threading.Event()

    def gpu(x):
        release.wait(60)
        return x

    run = engine.start("sum(await gather(*[gpu(i) for i in range(5)]))", {"gpu": gpu}, key="slots", concurrency=1)
    progress = wait_until(lambda: (p := run.progress).limited == 4 and p.running == 1 and p, what="4 limited calls")
    assert progress.queued == 0
    assert sorted(c.status for c in run.calls()) == ["limited"] * 4 + ["running"]
    assert ("limited", 4) in progress.details()
    release.set()
    assert run.result(60) == 10


# -- rates ---------------------------------------------------------------------------------------


def test_a_rate_spaces_call_starts_evenly_across_runs(engine: Engine) -> None:
    starts: list[float] = []
    lock = threading.Lock()

    @limits(rate="20/s")
    def api(x):
        with lock:
            starts.append(time.monotonic())
        return x

    code = "sum(await gather(*[api(i) for i in range(8)]))"
    first = engine.start(code, {"api": api}, key="api-a")
    second = engine.start(code, {"api": api}, key="api-b")
    assert first.result(60) == second.result(60) == 28
    starts.sort()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 16
    assert min(gaps) >= 0.05 * 0.8  # smooth: never a burst
    assert starts[-1] - starts[0] >= 15 * 0.05 * 0.9


def test_retry_after_delays_the_call_and_the_others_without_counting_a_failure(engine: Engine) -> None:
    events: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    told = threading.Event()

    def api(x):  # no retry policy: a RetryAfter is not a failed attempt
        with lock:
            events.append(("start", x, time.monotonic()))
            first_time = x == 0 and not told.is_set()
            if first_time:
                told.set()
        if first_time:
            raise RetryAfter(0.5, "429 Too Many Requests")
        return x

    code = "r0 = await api(0)\nrest = await gather(*[api(i) for i in range(1, 4)])\n[r0, *rest]"
    run = engine.start(code, {"api": api}, key="retry-after")
    assert run.result(60) == [0, 1, 2, 3]
    told_at = events[0][2]
    later = [t for kind, _, t in events[1:]]
    assert len(later) == 4 and min(later) - told_at >= 0.5 * 0.8  # the call and the others waited
    (first,) = [c for c in run.calls() if c.args == "0"]
    assert first.status == "done" and first.attempts == 2


# -- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "workers must be a whole number of at least 1, not 0"),
        ({"timeout": -1}, "timeout must be a positive number of seconds, not -1"),
        ({"concurrency": 0}, "concurrency must be a whole number of at least 1, not 0"),
        ({"rate": "0/s"}, "rate '0/s' must allow at least one call"),
        ({"rate": "fast"}, "rate 'fast' is not N/s, N/min or N/h"),
        ({"rate": "10/fortnight"}, "rate '10/fortnight' is not N/s, N/min or N/h"),
    ],
)
def test_options_out_of_range_are_refused_before_anything_runs(
    engine: Engine, options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    ran: list[int] = []
    with pytest.raises(ValueError, match=message):
        engine.start("await f(1)", {"f": ran.append}, key="bad", **options)
    assert ran == [] and engine.executions() == []
    with pytest.raises(ValueError, match=message):
        Engine(tmp_path / "other.db", **options)


def test_rates_parse_in_the_units_people_write() -> None:
    assert Rate.parse("10/s").interval == pytest.approx(0.1)
    assert Rate.parse("120/min").interval == pytest.approx(0.5)
    assert Rate.parse(" 2 / h ").interval == pytest.approx(1800)
    assert str(Rate.parse("100/min")) == "100/min"
