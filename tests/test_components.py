"""The call controls as components of the driver, alone: a small loop stands in for the driver.

Each component reaches the loop only through ``components.Loop`` (function, wake, push_timer,
settle, emit_retrying, book, executor); here that loop records what it is asked.
"""

from __future__ import annotations

import uuid
from typing import Any

from durable_monty_nb import limits
from durable_monty_nb.engine.controls import NO_LIMITS, RetryAfter, gate
from durable_monty_nb.engine.driver.book import PENDING, RETRYING, CallBook
from durable_monty_nb.engine.driver.calls import CallState
from durable_monty_nb.engine.driver.clock import ManualClock
from durable_monty_nb.engine.driver.components import Component, Hooks
from durable_monty_nb.engine.driver.limiting import Admission, Controls, RetryAfters, Timeouts, call_controls
from durable_monty_nb.executors.base import ErrorInfo, Outcome, Task


class Executor:
    name, remote, durable = "threads", False, False

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel(self, tasks: list[Task]) -> None:
        self.cancelled += [task.id for task in tasks]


class RecordingLoop:
    def __init__(self, functions: dict[str, Any], clock: ManualClock | None = None) -> None:
        self.functions = functions
        self.book = CallBook()
        self.executor = Executor()
        self.clock = clock or ManualClock(0.0)
        self.timers: list[tuple[float, int]] = []
        self.settled: list[Outcome] = []
        self.wakes = 0
        self.retrying: list[tuple[int, float]] = []

    def function(self, name: str) -> Any:
        return self.functions.get(name)

    def wake(self) -> None:
        self.wakes += 1

    def push_timer(self, due: float, state: CallState) -> None:
        self.timers.append((due, state.call_id))

    def settle(self, outcome: Outcome) -> None:
        self.settled.append(outcome)

    def emit_retrying(self, state: CallState, wait: float, message: str) -> None:
        self.retrying.append((state.call_id, wait))


def calls(loop: RecordingLoop, function: str, count: int) -> list[CallState]:
    states = [CallState(i, function, "call", "[[],{}]", True) for i in range(count)]
    for state in states:
        loop.book.add(state)
    return states


def test_hooks_hold_only_what_each_component_implements() -> None:
    loop = RecordingLoop({})
    hooks = Hooks(call_controls(loop, NO_LIMITS))  # type: ignore[arg-type]
    assert [type(h.__self__).__name__ for h in hooks.admit] == ["Admission"]
    assert [type(h.__self__).__name__ for h in hooks.started] == ["Timeouts"]
    assert [type(h.__self__).__name__ for h in hooks.ended] == ["Admission", "Timeouts"]
    assert [type(h.__self__).__name__ for h in hooks.failed] == ["RetryAfters"]
    assert Hooks([Component()]).started == []  # a component with no hooks costs the loop nothing


def test_a_deadline_settles_the_attempt_as_a_timeout_and_cancels_it() -> None:
    name = f"slow_{uuid.uuid4().hex[:8]}"

    @limits(timeout=2)
    def slow() -> None: ...

    loop = RecordingLoop({name: slow})
    timeouts = Timeouts(loop, Controls(loop, NO_LIMITS))  # type: ignore[arg-type]
    (state,) = calls(loop, name, 1)
    state.task = Task("e1", 0, 1, name, started_at=100.0)
    timeouts.started(state, 100.0)
    assert loop.timers == [(102.0, 0)] and state.timeout_at == 102.0
    assert not timeouts.timer(state, 101.0)  # not due yet
    assert timeouts.timer(state, 102.0)
    (outcome,) = loop.settled
    assert not outcome.ok and outcome.error is not None and "TimeoutError" in outcome.error.types[0]
    assert f"{name}() did not finish within 2 s" in outcome.error.message
    timeouts.after_timers()
    assert loop.executor.cancelled == [state.task.id]


def test_a_deadline_counts_from_the_attempts_start_not_while_it_waits_in_a_queue() -> None:
    name = f"queued_{uuid.uuid4().hex[:8]}"

    @limits(timeout=2)
    def queued() -> None: ...

    loop = RecordingLoop({name: queued})
    timeouts = Timeouts(loop, Controls(loop, NO_LIMITS))  # type: ignore[arg-type]
    (state,) = calls(loop, name, 1)
    state.task = Task("e1", 0, 1, name)  # dispatched at 100, not started yet
    timeouts.started(state, 100.0)
    assert not timeouts.timer(state, 102.0)  # still waiting for a thread: looked at again a second later
    assert loop.timers[-1] == (103.0, 0)
    state.task.started_at = 102.5  # a thread took it
    assert not timeouts.timer(state, 103.0)
    assert loop.timers[-1] == (104.5, 0)  # two seconds from its start
    assert timeouts.timer(state, 104.5) and len(loop.settled) == 1


def test_admission_holds_calls_over_the_concurrency_and_wakes_the_loop_when_a_slot_frees() -> None:
    name = f"one_at_a_time_{uuid.uuid4().hex[:8]}"

    @limits(concurrency=1)
    def one() -> None: ...

    loop = RecordingLoop({name: one})
    admission = Admission(loop, Controls(loop, NO_LIMITS))  # type: ignore[arg-type]
    first, second = calls(loop, name, 2)
    assert admission.admit([first, second], 0.0) == [first]
    assert first.slot and second.limited == "slot" and admission.waiting() == 1
    admission.ended(first)  # the attempt ended: its slot goes back, the loop is woken
    assert loop.wakes == 1 and not first.slot
    assert admission.admit([], 0.0) == [second] and admission.waiting() == 0
    admission.close()  # the run ended: the slot still held goes back
    assert gate(name).running == 0


def test_a_retry_after_moves_the_call_to_retrying_without_a_failure() -> None:
    loop = RecordingLoop({})
    retry_afters = RetryAfters(loop)  # type: ignore[arg-type]
    (state,) = calls(loop, f"api_{uuid.uuid4().hex[:8]}", 1)
    error = ErrorInfo.of(RetryAfter(3, "busy"))
    loop.clock.set(50.0)  # the delay counts from when the driver learns of it, by its clock
    assert retry_afters.failed(state, Outcome(0, 1, False, error=error, finished_at=10.0))
    assert state.status is RETRYING and state.due_at == 53.0 and state.deferred == 1
    assert loop.timers == [(53.0, 0)] and loop.retrying == [(0, 3.0)]
    assert loop.book.snapshot().failed == 0
    other = ErrorInfo.of(ValueError("no"))
    (plain,) = [CallState(9, "f", "call", "[[],{}]", True)]
    loop.book.add(plain)
    assert not retry_afters.failed(plain, Outcome(9, 1, False, error=other, finished_at=1.0))
    assert plain.status is PENDING


def test_a_retry_afters_delay_is_read_as_a_number_never_from_its_message() -> None:
    class Polite(RetryAfter):
        def __str__(self) -> str:
            return "please come back later"  # no delay in the message

    loop = RecordingLoop({}, ManualClock(10.0))
    (state,) = calls(loop, f"api_{uuid.uuid4().hex[:8]}", 1)
    error = ErrorInfo.of(Polite(7))
    assert error.retry_after == 7.0 and "7" not in error.message
    assert RetryAfters(loop).failed(state, Outcome(0, 1, False, error=error))  # type: ignore[arg-type]
    assert state.due_at == 17.0 and loop.retrying == [(0, 7.0)]
