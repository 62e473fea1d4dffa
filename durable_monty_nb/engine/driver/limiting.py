"""Call controls as components of the driver: admission by concurrency and rate, timeouts, RetryAfter.

- :class:`Admission`: calls of a function with a concurrency limit or a rate wait in it until
  their function's process-wide :class:`~..controls.Gate` admits them; a slot is given back
  when the attempt ends (or times out).
- :class:`Timeouts`: a timed-out attempt is settled as a ``TimeoutError`` at its deadline and
  the executor is asked to cancel it: the cell never waits for a hung call.
- :class:`RetryAfters`: a ``RetryAfter`` runs the call again after the delay it asked for, not
  counted as a failure; the other calls of the function wait too.

Each reaches the loop only through :class:`~.components.Loop`; :class:`Controls` is the
per-function lookup they share.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ...executors.base import ErrorInfo, Outcome, Task
from ..controls import GATES, NO_LIMITS, RETRY_AFTER_TYPE, CallControls, controls_for, gate
from .components import Component, Loop

if TYPE_CHECKING:
    from .calls import CallState

TIMEOUT_TYPES = ("builtins.TimeoutError", "builtins.OSError", "builtins.Exception", "builtins.BaseException")
QUEUED_CHECK = 1.0  # seconds between looks at a timed call still waiting to start


class Controls:
    """The call controls of each function of a run (its own, over the run's defaults), looked up once."""

    def __init__(self, loop: Loop, default: CallControls) -> None:
        self._loop = loop
        self._default = default
        self._found: dict[str, CallControls] = {}

    def of(self, function: str) -> CallControls:
        found = self._found.get(function)
        if found is None:
            fn = self._loop.function(function)
            found = self._found[function] = controls_for(fn, self._default) if fn else NO_LIMITS
        return found


class Admission(Component):
    """Concurrency and rate (see the module docstring)."""

    def __init__(self, loop: Loop, controls: Controls) -> None:
        self._loop = loop
        self._controls = controls
        self._limited: dict[str, deque[CallState]] = {}  # calls waiting for admission, by function
        self._check_at: float | None = None  # when a rate token may be free again
        self._waiting_slot: set[str] = set()

    def admit(self, states: list[CallState], now: float) -> list[CallState]:
        """The calls that may start now (each holding a slot); the others wait here.

        O(1) per call: unlimited functions pass straight through, and a function's waiting
        calls are admitted from the head of its queue until its gate says stop.
        """
        admitted: list[CallState] = []
        limited = self._limited
        for state in states:
            name = state.function
            if name in limited:
                limited[name].append(state)
                continue
            if not self._controls.of(name).limited:
                held = GATES.get(name)
                if held is None or held.next_start <= now:
                    admitted.append(state)
                    continue
            limited[name] = deque((state,))
        if not limited:
            return admitted
        self._check_at = None
        for name in list(limited):
            waiting = limited[name]
            controls = self._controls.of(name)
            function_gate = gate(name)
            while waiting:
                wait = function_gate.admit(controls, now)
                if wait != 0.0:
                    break
                state = waiting.popleft()
                state.limited, state.slot = None, True
                admitted.append(state)
            if not waiting:
                del limited[name]
                continue
            label = "slot" if wait is None else "rate"
            for state in reversed(waiting):
                if state.limited == label:
                    break  # labelled on an earlier turn (the queue grows at its tail)
                state.limited = label
            if wait is None:
                if name not in self._waiting_slot:
                    self._waiting_slot.add(name)
                    function_gate.wait_for_slot(id(self), self._loop.wake)
            else:
                due = now + wait
                self._check_at = due if self._check_at is None else min(self._check_at, due)
        return admitted

    def ended(self, state: CallState) -> None:
        if state.slot:
            state.slot = False
            gate(state.function).release()

    def next_check(self) -> float | None:
        return self._check_at

    def waiting(self) -> int:
        return sum(len(waiting) for waiting in list(self._limited.values()))  # read by other threads

    def close(self) -> None:
        """Give back slots of attempts still running, stop waiting for slots."""
        for state in self._loop.book.calls.values():
            self.ended(state)
        for name in self._waiting_slot:
            gate(name).forget(id(self))


class Timeouts(Component):
    """An attempt's deadline (see the module docstring)."""

    def __init__(self, loop: Loop, controls: Controls) -> None:
        self._loop = loop
        self._controls = controls
        self._to_cancel: list[Task] = []  # timed-out attempts, cancelled together after the timers

    def started(self, state: CallState, now: float) -> None:
        timeout = self._controls.of(state.function).timeout
        if timeout is not None:
            state.timeout_at = now + timeout
            self._loop.push_timer(state.timeout_at, state)

    def ended(self, state: CallState) -> None:
        state.timeout_at = None

    def timer(self, state: CallState, now: float) -> bool:
        """Settle the attempt of ``state`` as timed out if its deadline passed."""
        task = state.task
        if task is None or state.timeout_at is None or state.timeout_at > now:
            return False
        timeout = self._controls.of(state.function).timeout or 0.0
        # An attempt's time starts when it starts running: while it waits for a thread or a worker
        # the deadline moves on (checked again within a second), so a queue never times calls out.
        deadline = task.started_at + timeout if task.started_at else now + min(timeout, QUEUED_CHECK)
        if deadline > now:
            state.timeout_at = deadline
            self._loop.push_timer(deadline, state)
            return False
        message = f"{state.function}() did not finish within {timeout:g} s"
        executor = self._loop.executor
        where = "its thread cannot be killed and is left to finish; its result will be ignored"
        if executor.remote:
            where = f"its job on the {executor.name} executor was cancelled"
        self._to_cancel.append(task)
        error = ErrorInfo(TIMEOUT_TYPES, message, f"TimeoutError: {message} ({where})")
        # Settled as any failed attempt (the bookkeeping and the retry policy); its real
        # outcome, if it ever comes, is for an attempt the driver no longer waits for.
        started = task.started_at or 0.0
        self._loop.settle(Outcome(state.call_id, task.attempt, False, error=error, started_at=started, finished_at=now))
        return True

    def after_timers(self) -> None:
        """Cancel the attempts that timed out in one request, those not started yet first (so a
        worker freed by a cancelled running attempt never picks up one about to be cancelled)."""
        tasks, self._to_cancel = self._to_cancel, []
        cancel = getattr(self._loop.executor, "cancel", None)
        if tasks and cancel is not None:
            cancel(sorted(tasks, key=lambda task: bool(task.started_at)))


class RetryAfters(Component):
    """A ``RetryAfter`` (see the module docstring)."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop

    def failed(self, state: CallState, outcome: Outcome) -> bool:
        error = outcome.error
        if error is None or RETRY_AFTER_TYPE not in error.types:
            return False
        delay = error.retry_after if error.retry_after is not None else 1.0  # 1.0: a record of an older release
        # From when the driver learns of it, by its own clock (a worker's may differ).
        due = self._loop.clock.now() + delay
        gate(state.function).hold_until(due)  # the other calls of the function wait too
        state.deferred += 1
        self._loop.book.transition_pending_retrying(state, due)
        self._loop.push_timer(due, state)
        self._loop.emit_retrying(state, delay, error.message)
        return True


def call_controls(loop: Loop, default: CallControls) -> list[Component]:
    """The components of the call controls, in the order the loop calls them."""
    controls = Controls(loop, default)
    return [Admission(loop, controls), Timeouts(loop, controls), RetryAfters(loop)]
