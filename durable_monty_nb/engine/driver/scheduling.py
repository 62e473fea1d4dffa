"""Scheduling: dispatch calls to the executor, collect their outcomes, retry, fire timers.

For a durable executor each attempt is journaled (in the step's transaction) before it is
dispatched; on resume, attempts without an outcome are attached to, not run again, unless the
executor says they are lost.
"""

from __future__ import annotations

import dataclasses
import heapq
import queue
from typing import TYPE_CHECKING, Any

from ...defaults import INLINE_LIMIT
from ...errors import ValueCrossingError
from ...executors.base import ErrorInfo, LocalCall, Outcome, Task, attempt_id
from ...executors.current import enter_call
from ...executors.record import outcome_of
from ...values import SCALARS, blob_key, ship_function
from ..events import CallFailed, CallRetrying
from ..frames import FrameIndex
from .calls import RETRYING, CallState
from .exceptions import error_answer, last_message, sandbox_exception_type

if TYPE_CHECKING:
    from .loop import Driver

DRAIN_LIMIT = 5000
MAX_LOST_ATTEMPTS = 3
WAKE = object()


class Scheduling:
    """Mixin of :class:`Driver`: calls between the ledger and the executor."""

    # -- before the commit: what dispatch needs in the store ----------------------------------

    def _journal_attempts(self: Driver) -> None:
        """Ship the functions and journal the attempts of the calls about to be dispatched."""
        now = self.clock.now()
        ready = []
        for state in self._to_dispatch:
            if self.executor.remote and not self._ship(state):
                continue
            task = self._task(state)
            ready.append(state)
            if task.id in self._journaled:  # journaled by a commit that did not reach the store
                continue
            self._journaled.add(task.id)
            self.step.attempts.append(
                {
                    "attempt_id": task.id,
                    "execution_id": self.execution_id,
                    "call_id": state.call_id,
                    "attempt": task.attempt,
                    "executor": self.executor.name,
                    "status": "dispatched",
                    "created_at": now,
                }
            )
        self._to_dispatch = ready

    def _ship(self: Driver, state: CallState) -> bool:
        """Put the call's function (and large arguments) in the store for remote workers.

        False, with the call failed, when the function cannot be shipped.
        """
        name = state.function
        if name not in self._shipped:
            fn = self._function(name)
            try:
                if fn is None:
                    raise NameError(f"name {name!r} is not defined in the namespace")
                key, data = ship_function(fn, name)
            except (ValueCrossingError, NameError) as exc:
                self._settle_failure(state, ErrorInfo.of(exc, f"{type(exc).__name__}: {exc}"), self.clock.now())
                return False
            self._shipped[name] = key
            self.step.functions[key] = (name, state.fingerprint, data)
        if len(state.args_text) > INLINE_LIMIT and state.call_id not in self._args_blobs:
            data = state.args_text.encode()
            key = blob_key(data)
            self.step.blobs[key] = (data, "arguments")
            self._args_blobs[state.call_id] = key
        return True

    # -- dispatch -----------------------------------------------------------------------------

    def _dispatch(self: Driver) -> None:
        states, self._to_dispatch = self._to_dispatch, []
        now = self.clock.now()
        for admit in self.hooks.admit:  # concurrency and rate limits (limiting.py)
            states = admit(states, now)
        tasks = []
        dispatchers = self.hooks.dispatch
        for state in states:
            if dispatchers and any(dispatch(state, now) for dispatch in dispatchers):
                if state.task is not None:  # published for completion from outside (waits.py)
                    self._in_flight += 1
                continue
            task = self._task(state)
            if not self.executor.remote:
                task.local = self._local_call(state)
                if task.local is None:
                    continue
                enter_call(self.store, task)  # code inside the call knows it (durable units of agents)
            state.task = task
            tasks.append(task)
            for started in self.hooks.started:  # the attempt's deadline (limiting.py)
                started(state, now)
        if tasks:
            self._in_flight += len(tasks)
            self.executor.submit(tasks, self._outcomes.put)

    def _withdraw_queued(self: Driver) -> None:
        """On a stop: take back from the executor the attempts it has not started, so no new
        call starts; running ones finish and are kept. Taken-back calls stay pending (a resume
        runs them; so does this driver if the stop is undone)."""
        withdraw = getattr(self.executor, "withdraw", None)
        if withdraw is None:
            return
        # Every attempt in flight on the executor (external calls are not): the executor knows
        # which started (Dask counts a task a worker holds in its queue as processing, and so as
        # started here).
        external = self.waiting.externals.holds
        queued = [s.task for s in list(self.calls.values()) if s.task is not None and not external(s.call_id)]
        if not queued:
            return
        for task in withdraw(queued):
            if self.executor.durable:  # journaled as dispatched: a resume must not wait for it
                self.step.lost_attempts.append(task.id)
            state = self.calls[task.call_id]
            state.task = None
            for ended in self.hooks.ended:  # slots given back, deadlines dropped (limiting.py)
                ended(state)
            self._in_flight -= 1
            self._to_dispatch.append(state)

    def _task(self: Driver, state: CallState) -> Task:
        """The task of the call's next attempt (described by data)."""
        return Task(
            self.execution_id,
            state.call_id,
            state.attempts + 1,
            state.function,
            self._shipped.get(state.function, ""),
            state.args_text,
            args_blob=self._args_blobs.get(state.call_id, ""),
        )

    def _local_call(self: Driver, state: CallState) -> LocalCall | None:
        """The live callable and arguments of a call, for in-process executors (None: the call failed)."""
        fn = self._function(state.function)
        if fn is None:
            error = NameError(f"name {state.function!r} is not defined")
            text = f"NameError: {state.function!r} is not defined in the namespace"
            self._settle_failure(state, ErrorInfo.of(error, text), self.clock.now())
            return None
        if state.sandbox_args is not None:
            args, kwargs = state.sandbox_args
            if not kwargs and all(type(a) in SCALARS for a in args):
                args = tuple(args)  # the common case: nothing to swap for host objects
            else:
                args, kwargs = self.codec.to_host(state.sandbox_args)
        else:
            args, kwargs = self.codec.decode_host(state.args_text)
        return LocalCall(fn, tuple(args), dict(kwargs))

    def _attach_pending(self: Driver) -> None:
        """On resume with a durable executor: follow the attempts an earlier process dispatched.

        Attempts with an outcome in the store are collected, attempts the executor still has
        are waited for, and only lost ones (or never dispatched ones) run again.
        """
        states, self._to_attach = self._to_attach, []
        if not states:
            return
        tasks = {}
        for state in states:
            task = self._task(state)
            tasks[task.id] = (state, task)
        records = self.store.load_attempts(list(tasks))
        follow = []
        for task_id, (state, task) in tasks.items():
            record = records.get(task_id)
            if record is None:  # never dispatched (journaled by an executor without attempts)
                self._to_dispatch.append(state)
                continue
            if record.status == "lost":  # withdrawn by a cancel before it started: a new attempt
                state.attempts, state.lost = task.attempt, state.lost + 1
                self.book.journal(state)
                self._to_dispatch.append(state)
                continue
            state.task = task
            self._in_flight += 1
            if record.finished:
                self._outcomes.put(outcome_of(record))
            elif record.executor == self.executor.name:
                follow.append(task)
            else:
                self._outcomes.put(Outcome.lost_attempt(task, f"dispatched to the {record.executor} executor"))
        for task in self.executor.attach(follow, self._outcomes.put) if follow else []:
            # finished since the first look? _collect reads the store before it runs anything again
            self._outcomes.put(Outcome.lost_attempt(task, f"the {self.executor.name} executor no longer has it"))

    # -- outcomes -----------------------------------------------------------------------------

    def _wait(self: Driver, timeout: float | None = None) -> list[Any]:
        timeout = self.settings.heartbeat if timeout is None else timeout
        if not self._stopping:
            now = self.clock.now()
            if self._timers:
                timeout = max(min(timeout, self._timers[0][0] - now), 0.0)
            for next_check in self.hooks.next_check:
                check_at = next_check()
                if check_at is not None:
                    timeout = max(min(timeout, check_at - now), 0.0)
        try:
            first = self._outcomes.get(timeout=timeout)
        except queue.Empty:
            return []
        items = [first]
        get = self._outcomes.get_nowait
        try:
            while len(items) < DRAIN_LIMIT:
                items.append(get())
        except queue.Empty:
            pass
        return items

    def _collect(self: Driver, items: list[Any]) -> None:
        # Large results a worker left in the store, and attempts an executor gave up as lost (a
        # worker that wrote its outcome and died before it said so): one read of the store for the
        # batch. An outcome found there is collected; only an attempt without one runs again.
        look = [o for o in items if o is not WAKE and (o.in_store or (o.lost and self.executor.durable))]
        if look:
            ids = {attempt_id(self.execution_id, o.call_id, o.attempt): o for o in look}
            records = self.store.load_attempts(list(ids))
            kept = [o for key, o in ids.items() if o.lost and not (key in records and records[key].finished)]
            looked = {id(o) for o in look}
            items = [o for o in items if id(o) not in looked]
            items += kept + [outcome_of(record) for record in records.values() if record.finished]
        for outcome in items:
            if outcome is WAKE:
                continue
            state = self.calls.get(outcome.call_id)
            if state is None or outcome.attempt != state.attempts + 1 or state.task is None:
                continue  # an outcome of an attempt this driver no longer waits for
            self._in_flight -= 1
            state.task = None
            for ended in self.hooks.ended:  # slots given back, deadlines dropped (limiting.py)
                ended(state)
            state.attempts = outcome.attempt
            state.started_at, state.finished_at = outcome.started_at or None, outcome.finished_at
            state.worker = outcome.worker or None
            if outcome.ok:
                self._settle_success(state, outcome)
            else:
                self._settle_attempt_failure(state, outcome)

    def _settle_success(self: Driver, state: CallState, outcome: Outcome) -> None:
        if outcome.result is not None:  # stored by a remote worker: handles stay handles
            text, sandbox_value = outcome.result, self.codec.decode_sandbox(outcome.result)
        else:
            try:
                text, sandbox_value = self.codec.encode(outcome.value, what=f"the result of {state.function}()")
            except ValueCrossingError as exc:
                self._settle_failure(state, ErrorInfo.of(exc, f"ValueCrossingError: {exc}"), outcome.finished_at)
                return
        self.book.transition_pending_done(state, text, {"return_value": sandbox_value})

    def _settle_attempt_failure(self: Driver, state: CallState, outcome: Outcome) -> None:
        error = outcome.error
        assert error is not None
        if self.executor.remote and error.traceback:  # frames of code shipped by value: give them back their source
            error = outcome.error = self._local_frames(state.function, error)
        if outcome.lost:
            self.step.lost_attempts.append(attempt_id(self.execution_id, state.call_id, outcome.attempt))
            state.lost += 1
            if state.lost <= MAX_LOST_ATTEMPTS:
                self.book.journal(state)  # still pending: its next attempt is dispatched at once
                self._to_dispatch.append(state)
                self._emit_retrying(state, 0.0, error.message)
                return
            self._settle_failure(state, error, outcome.finished_at)
            return
        if self._before_fix.pop(state.call_id, None) == outcome.attempt:
            # An attempt the failed run left going, ended in failure after the cell was run again
            # to retry what failed: it is one of those, so it gets their fresh try.
            state.earlier = state.attempts  # the policy starts over, as for a failed call
            self.book.journal(state)
            self._to_dispatch.append(state)
            self._emit_retrying(state, 0.0, error.message)
            return
        for failed in self.hooks.failed:  # a RetryAfter (limiting.py), the retry policy (retries.py)
            if failed(state, outcome):
                return
        self._settle_failure(state, error, outcome.finished_at)

    def _local_frames(self: Driver, function: str, error: ErrorInfo) -> ErrorInfo:
        """A worker's traceback with the frames of ``function`` (and what it reaches) mapped back to
        the files and source lines this process holds (see :mod:`..frames`)."""
        index = self._frame_indexes.get(function)
        if index is None:
            fn = self._function(function)
            index = self._frame_indexes[function] = FrameIndex([fn] if fn is not None else [])
        text = index.restore(error.traceback)
        return error if text == error.traceback else dataclasses.replace(error, traceback=text)

    def _emit_retrying(self: Driver, state: CallState, wait: float, message: str) -> None:
        self.run.events.emit(
            CallRetrying(self.execution_id, state.call_id, state.function, state.attempts, wait, message)
        )

    def _settle_failure(self: Driver, state: CallState, error: ErrorInfo, finished_at: float) -> None:
        exc_type = sandbox_exception_type(error)
        answer = error_answer(exc_type, error.message)
        self.book.transition_pending_failed(state, exc_type, error.message, error.traceback, finished_at, answer)
        self.run.events.emit(
            CallFailed(self.execution_id, state.call_id, state.function, state.attempts, last_message(error.traceback))
        )

    # -- timers (retry backoff, attempts' deadlines, durable sleeps, waits' deadlines) --------

    def _push_timer(self: Driver, due: float, state: CallState) -> None:
        heapq.heappush(self._timers, (due, next(self._timer_seq), state.call_id))

    def _fire_timers(self: Driver) -> None:
        now = self.clock.now()
        timers = self.hooks.timer
        while self._timers and self._timers[0][0] <= now:
            _, _, call_id = heapq.heappop(self._timers)
            state = self.calls[call_id]
            if state.status is RETRYING:
                if state.due_at is None or state.due_at <= now:  # not an older timer of the call
                    state.due_at = None
                    self.book.transition_retrying_pending(state)
                    self._to_dispatch.append(state)
                continue
            for timer in timers:  # a sleep, an attempt's deadline, a wait's deadline (limiting.py, waits.py)
                if timer(state, now):
                    break
        for after_timers in self.hooks.after_timers:
            after_timers()
