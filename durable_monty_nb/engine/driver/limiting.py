"""Call controls in the driver: admission by concurrency and rate, timeouts, RetryAfter.

Calls of a function with a concurrency limit or a rate wait in ``_limited`` until their
function's process-wide :class:`~..controls.Gate` admits them; a slot is given back when the
attempt ends (or times out). A timed-out attempt is settled as a ``TimeoutError`` at its
deadline and the executor is asked to cancel it: the cell never waits for a hung call.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from ...executors.base import ErrorInfo, Outcome, Task
from ..controls import GATES, NO_LIMITS, RETRY_AFTER_TYPE, CallControls, controls_for, gate, retry_after_seconds
from .calls import CallState

if TYPE_CHECKING:
    from .loop import Driver

TIMEOUT_TYPES = ("builtins.TimeoutError", "builtins.OSError", "builtins.Exception", "builtins.BaseException")


class Limiting:
    """Mixin of :class:`Driver`: see the module docstring."""

    def _init_limits(self: Driver) -> None:
        self._limited: dict[str, deque[CallState]] = {}  # calls waiting for admission, by function
        self._limit_check_at: float | None = None  # when a rate token may be free again
        self._controls: dict[str, CallControls] = {}
        self._waiting_slot: set[str] = set()
        self._to_cancel: list[Task] = []  # timed-out attempts, cancelled together after the timers

    def _controls_of(self: Driver, function: str) -> CallControls:
        found = self._controls.get(function)
        if found is None:
            fn = self._function(function)
            found = self._controls[function] = controls_for(fn, self.settings.controls) if fn else NO_LIMITS
        return found

    def _admit(self: Driver, states: list[CallState]) -> list[CallState]:
        """The calls that may start now (each holding a slot); the others wait in ``_limited``.

        O(1) per call: unlimited functions pass straight through, and a function's waiting
        calls are admitted from the head of its queue until its gate says stop.
        """
        now = time.time()
        admitted: list[CallState] = []
        limited = self._limited
        for state in states:
            name = state.function
            if name in limited:
                limited[name].append(state)
                continue
            if not self._controls_of(name).limited:
                held = GATES.get(name)
                if held is None or held.next_start <= now:
                    admitted.append(state)
                    continue
            limited[name] = deque((state,))
        if not limited:
            return admitted
        self._limit_check_at = None
        for name in list(limited):
            waiting = limited[name]
            controls = self._controls_of(name)
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
                    function_gate.wait_for_slot(id(self), self._wake)
            else:
                due = now + wait
                self._limit_check_at = due if self._limit_check_at is None else min(self._limit_check_at, due)
        return admitted

    @property
    def limited_count(self: Driver) -> int:
        return sum(len(waiting) for waiting in list(self._limited.values()))  # read by other threads

    def _wake(self: Driver) -> None:
        from .scheduling import WAKE

        self._outcomes.put(WAKE)

    def _release_slot(self: Driver, state: CallState) -> None:
        if state.slot:
            state.slot = False
            gate(state.function).release()

    def _forget_limits(self: Driver) -> None:
        """At the end: give back slots of attempts still running, stop waiting for slots."""
        for state in self.calls.values():
            self._release_slot(state)
        for name in self._waiting_slot:
            gate(name).forget(id(self))

    def _start_deadline(self: Driver, state: CallState) -> None:
        """At dispatch: the attempt's deadline, as a timer."""
        timeout = self._controls_of(state.function).timeout
        if timeout is not None:
            state.timeout_at = time.time() + timeout
            self._push_timer(state.timeout_at, state)

    def _time_out(self: Driver, state: CallState, now: float) -> bool:
        """A timer fired for ``state``: settle its attempt as timed out if its deadline passed."""
        task = state.task
        if task is None or state.timeout_at is None or state.timeout_at > now:
            return False
        timeout = self._controls_of(state.function).timeout or 0.0
        message = f"{state.function}() did not finish within {timeout:g} s"
        where = "its thread cannot be killed and is left to finish; its result will be ignored"
        if self.executor.remote:
            where = f"its job on the {self.executor.name} executor was cancelled"
        self._to_cancel.append(task)
        error = ErrorInfo(TIMEOUT_TYPES, message, f"TimeoutError: {message} ({where})")
        # Settled as any failed attempt (the bookkeeping and the retry policy of _collect); its
        # real outcome, if it ever comes, is for an attempt the driver no longer waits for.
        started = task.started_at or 0.0
        self._collect([Outcome(state.call_id, task.attempt, False, error=error, started_at=started, finished_at=now)])
        return True

    def _cancel_timed_out(self: Driver) -> None:
        """Cancel the attempts that timed out in one request, those not started yet first (so a
        worker freed by a cancelled running attempt never picks up one about to be cancelled)."""
        tasks, self._to_cancel = self._to_cancel, []
        cancel = getattr(self.executor, "cancel", None)
        if tasks and cancel is not None:
            cancel(sorted(tasks, key=lambda task: bool(task.started_at)))

    def _retry_after(self: Driver, state: CallState, outcome: Outcome) -> bool:
        """A RetryAfter: run the call again after the delay it asked for, not counted as a failure."""
        error = outcome.error
        if error is None or RETRY_AFTER_TYPE not in error.types:
            return False
        delay = retry_after_seconds(error.message)
        due = outcome.finished_at + delay
        gate(state.function).hold_until(due)  # the other calls of the function wait too
        state.deferred += 1
        self.book.transition_pending_retrying(state, due)
        self._push_timer(due, state)
        self._emit_retrying(state, delay, error.message)
        return True
