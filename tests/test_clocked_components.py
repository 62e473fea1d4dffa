"""The call controls and retries over time, on a settable clock: timeouts, rates, RetryAfter and backoff delays
stepped through second by second without waiting for them.

A small loop stands in for the driver's turn order (fire due timers, then admit and start
what may start), as ``engine/driver/scheduling.py`` runs it; the executor only records what
it is asked. The same behaviour on real threads and real time: ``tests/test_controls.py``.
"""

from __future__ import annotations

import heapq
import uuid
from typing import Any

from loops import StandInLoop

from durable_monty_nb import limits, retry
from durable_monty_nb.engine.controls import NO_LIMITS, RetryAfter
from durable_monty_nb.engine.driver.book import PENDING, RETRYING
from durable_monty_nb.engine.driver.calls import CallState
from durable_monty_nb.engine.driver.clock import ManualClock
from durable_monty_nb.engine.driver.components import Hooks
from durable_monty_nb.engine.driver.limiting import call_controls
from durable_monty_nb.engine.driver.retries import Retries
from durable_monty_nb.engine.retry import RetryPolicy
from durable_monty_nb.executors.base import ErrorInfo, Outcome, Task


class Executor:
    """Starts what it is given at once (``started_at`` by the clock); records cancels."""

    name, remote, durable = "threads", False, False

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.running: dict[int, Task] = {}
        self.cancelled: list[int] = []

    def submit(self, tasks: list[Task]) -> None:
        for task in tasks:
            task.started_at = self.clock.now()
            self.running[task.call_id] = task

    def cancel(self, tasks: list[Task]) -> None:
        for task in tasks:
            self.running.pop(task.call_id, None)
            self.cancelled.append(task.call_id)


class ClockedLoop(StandInLoop):
    """The driver's turn order over a :class:`ManualClock`; see the module docstring."""

    def __init__(self, functions: dict[str, Any]) -> None:
        super().__init__(functions, 1_000.0)
        self.executor = Executor(self.clock)
        self.hooks = Hooks([*call_controls(self, NO_LIMITS), Retries(self, RetryPolicy())])  # type: ignore[arg-type]
        self.to_dispatch: list[CallState] = []
        self.started: list[tuple[float, int]] = []  # (time, call id) of each start
        self.failed: list[tuple[int, str]] = []

    # components.Loop (with StandInLoop's)
    def settle(self, outcome: Outcome) -> None:
        state = self.book.calls[outcome.call_id]
        self.executor.running.pop(outcome.call_id, None)
        self.end(state, outcome)

    # the loop's side
    def add(self, function: str, count: int) -> list[CallState]:
        first = len(self.book.calls)
        states = [CallState(first + i, function, "call", "[[],{}]", True) for i in range(count)]
        for state in states:
            self.book.add(state)
        self.to_dispatch += states
        return states

    def end(self, state: CallState, outcome: Outcome) -> None:
        """An attempt ended: the components see it, as the driver's outcome handling calls them."""
        state.task = None
        for ended in self.hooks.ended:
            ended(state)
        if outcome.ok:
            self.book.transition_pending_done(state, "null", {"return_value": None})
        elif not any(failed(state, outcome) for failed in self.hooks.failed):
            self.failed.append((state.call_id, outcome.error.message if outcome.error else ""))

    def finish(self, state: CallState, error: BaseException | None = None) -> None:
        """The executor reports the call's attempt (a value, or ``error``) now."""
        task = self.executor.running.pop(state.call_id)
        now = self.clock.now()
        info = None if error is None else ErrorInfo.of(error)
        self.end(state, Outcome(state.call_id, task.attempt, error is None, error=info, finished_at=now))

    def turn(self) -> None:
        """Fire the due timers, then admit and start what may start."""
        now = self.clock.now()
        while self.timers and self.timers[0][0] <= now:
            _, _, call_id = heapq.heappop(self.timers)
            state = self.book.calls[call_id]
            if state.status is RETRYING:
                if state.due_at is not None and state.due_at <= now:
                    state.due_at = None
                    self.book.transition_retrying_pending(state)
                    self.to_dispatch.append(state)
            else:
                any(timer(state, now) for timer in self.hooks.timer)
        for after_timers in self.hooks.after_timers:
            after_timers()
        states, self.to_dispatch = self.to_dispatch, []
        for admit in self.hooks.admit:
            states = admit(states, now)
        tasks = []
        for state in states:
            state.task = Task("e", state.call_id, state.attempts + 1, state.function)
            state.attempts += 1
            tasks.append(state.task)
            for started in self.hooks.started:
                started(state, now)
            self.started.append((now - 1_000.0, state.call_id))
        self.executor.submit(tasks)

    def at(self, seconds: float) -> None:
        """Move the clock to ``seconds`` after the start and take a turn."""
        self.clock.set(1_000.0 + seconds)
        self.turn()

    def next_check(self) -> float | None:
        wishes = [check() for check in self.hooks.next_check]
        wishes += [self.timers[0][0]] if self.timers else []
        found = [w for w in wishes if w is not None]
        return min(found) - 1_000.0 if found else None


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"  # gates are per function name and process-wide


def test_a_rate_starts_calls_evenly_and_says_when_to_look_again() -> None:
    name = unique("paced")

    @limits(rate="2/s")
    def paced() -> None: ...

    loop = ClockedLoop({name: paced})
    states = loop.add(name, 4)
    loop.at(0.0)
    assert loop.started == [(0.0, 0)] and loop.next_check() == 0.5
    for state in states[:1]:
        loop.finish(state)
    loop.at(0.4)  # not yet
    assert len(loop.started) == 1
    for seconds in (0.5, 1.0, 1.5):
        loop.at(seconds)
    assert loop.started == [(0.0, 0), (0.5, 1), (1.0, 2), (1.5, 3)]
    assert loop.hooks.waiting[0]() == 0


def test_a_timeout_fires_at_the_deadline_and_cancels_the_attempt() -> None:
    name = unique("slow")

    @limits(timeout=2)
    def slow() -> None: ...

    loop = ClockedLoop({name: slow})
    (state,) = loop.add(name, 1)
    loop.at(0.0)
    loop.at(1.99)
    assert not loop.failed and loop.executor.cancelled == []
    loop.at(2.0)
    assert loop.failed == [(0, f"{name}() did not finish within 2 s")]
    assert loop.executor.cancelled == [0] and state.timeout_at is None


def test_a_timeout_counts_from_the_start_not_the_wait_for_a_slot() -> None:
    name = unique("one")

    @limits(timeout=2, concurrency=1)
    def one() -> None: ...

    loop = ClockedLoop({name: one})
    first, second = loop.add(name, 2)
    loop.at(0.0)
    assert [c for _, c in loop.started] == [0] and second.limited == "slot"
    loop.at(1.5)
    loop.finish(first)  # its slot frees the second call, which starts at 1.5
    assert loop.wakes == 1
    loop.at(1.5)
    loop.at(3.4)  # 1.9 s into its attempt: within its timeout
    assert loop.started == [(0.0, 0), (1.5, 1)] and not loop.failed
    loop.at(3.5)
    assert loop.failed == [(1, f"{name}() did not finish within 2 s")]


def test_a_retry_after_holds_the_call_and_the_other_calls_of_its_function() -> None:
    name = unique("api")

    def api() -> None: ...

    loop = ClockedLoop({name: api})
    first = loop.add(name, 2)[0]
    loop.at(0.0)
    loop.finish(first, RetryAfter(3, "busy"))  # at 0: run again at 3, and nothing of api before
    assert first.status is RETRYING and first.due_at == 1_003.0 and not loop.failed
    third = loop.add(name, 1)[0]
    loop.at(2.9)
    assert [c for _, c in loop.started] == [0, 1] and third.limited == "rate"
    loop.at(3.0)
    assert sorted(c for t, c in loop.started if t == 3.0) == [0, 2]
    assert first.status is PENDING and first.attempts == 2 and first.deferred == 1
    assert loop.book.snapshot().failed == 0  # not counted as a failure


def test_a_failed_attempt_runs_again_after_its_backoff_until_the_policy_says_no_more() -> None:
    name = unique("flaky")

    @retry(retries=2, backoff="linear", delay=2, retry_on=ConnectionError)
    def flaky() -> None: ...

    loop = ClockedLoop({name: flaky})
    (state,) = loop.add(name, 1)
    loop.at(0.0)
    loop.finish(state, ConnectionError("down"))  # retry 1 after 2 s, retry 2 after 4 s more
    assert state.status is RETRYING and loop.next_check() == 2.0
    loop.at(1.9)
    assert len(loop.started) == 1
    loop.at(2.0)
    loop.finish(state, ConnectionError("down"))
    loop.at(5.9)
    assert [t for t, _ in loop.started] == [0.0, 2.0]
    loop.at(6.0)
    assert [t for t, _ in loop.started] == [0.0, 2.0, 6.0] and not loop.failed
    loop.finish(state, ConnectionError("still down"))  # the third failure is the call's
    assert loop.failed == [(0, "still down")] and state.status is PENDING

    (other,) = loop.add(name, 1)
    loop.at(7.0)
    loop.finish(other, ValueError("not a connection error"))  # not in retry_on: no retry
    assert loop.failed[-1] == (other.call_id, "not a connection error")
