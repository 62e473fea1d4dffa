"""Scheduling: dispatch calls to the executor, collect their outcomes, retry, fire timers.

For a durable executor each attempt is journaled (in the step's transaction) before it is
dispatched; on resume, attempts without an outcome are attached to, not run again, unless the
executor says they are lost.
"""

from __future__ import annotations

import dataclasses
import heapq
import queue
import time
from typing import TYPE_CHECKING, Any

from ...defaults import INLINE_LIMIT
from ...errors import ValueCrossingError
from ...executors.base import ErrorInfo, LocalCall, Outcome, Task, attempt_id
from ...executors.current import enter_call
from ...values import SCALARS, blob_key, ship_function
from ..events import CallFailed, CallRetrying
from ..frames import FrameIndex
from ..retry import policy_for
from .calls import CallState
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
        now = time.time()
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
                self._settle_failure(state, ErrorInfo.of(exc, f"{type(exc).__name__}: {exc}"), time.time())
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
        states = self._admit(states)  # concurrency and rate limits (limiting.py)
        tasks = []
        for state in states:
            if self._dispatch_external(state):  # published for completion from outside (waits.py)
                continue
            task = self._task(state)
            if not self.executor.remote:
                task.local = self._local_call(state)
                if task.local is None:
                    continue
                enter_call(self.store, task)  # code inside the call knows it (durable units of agents)
            state.status = "pending"
            state.task = task
            tasks.append(task)
            self._start_deadline(state)
        if tasks:
            self._in_flight += len(tasks)
            self.executor.submit(tasks, self._outcomes.put)

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
            self._settle_failure(state, ErrorInfo.of(error, text), time.time())
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
            state.task = task
            self._in_flight += 1
            if record.finished:
                self._outcomes.put(record.outcome())
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
        if self._timers and not self._stopping:
            timeout = max(min(timeout, self._timers[0][0] - time.time()), 0.0)
        if self._limit_check_at is not None and not self._stopping:
            timeout = max(min(timeout, self._limit_check_at - time.time()), 0.0)
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
            items += kept + [record.outcome() for record in records.values() if record.finished]
        for outcome in items:
            if outcome is WAKE:
                continue
            state = self.calls.get(outcome.call_id)
            if state is None or outcome.attempt != state.attempts + 1 or state.task is None:
                continue  # an outcome of an attempt this driver no longer waits for
            self._in_flight -= 1
            state.task = None
            state.timeout_at = None
            self._release_slot(state)
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
        state.status, state.result_text, state.error_text = "done", text, None
        self.answers[state.call_id] = {"return_value": sandbox_value}
        self.counters.done += 1
        state.error_type = state.error_message = state.due_at = None
        self._journal(state)

    def _settle_attempt_failure(self: Driver, state: CallState, outcome: Outcome) -> None:
        error = outcome.error
        assert error is not None
        if self.executor.remote and error.traceback:  # frames of code shipped by value: give them back their source
            error = outcome.error = self._local_frames(state.function, error)
        if self._retry_after(state, outcome):
            return
        if outcome.lost:
            self.step.lost_attempts.append(attempt_id(self.execution_id, state.call_id, outcome.attempt))
            state.lost += 1
            if state.lost <= MAX_LOST_ATTEMPTS:
                state.status = "pending"
                self._journal(state)
                self._to_dispatch.append(state)
                self._emit_retrying(state, 0.0, error.message)
                return
            self._settle_failure(state, error, outcome.finished_at)
            return
        policy = policy_for(self._function(state.function), self.settings.retry)
        if not policy.should_retry(state.policy_attempts, error):
            self._settle_failure(state, error, outcome.finished_at)
            return
        wait = policy.wait_before(state.policy_attempts)
        state.status, state.due_at = "retrying", outcome.finished_at + wait
        state.error_text, state.error_type = error.traceback, error.type_name
        self._push_timer(state.due_at, state)
        self._journal(state)
        self._emit_retrying(state, wait, last_message(error.traceback))

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
        state.status, state.error_text, state.error_type = "failed", error.traceback, exc_type
        state.error_message, state.finished_at = error.message, finished_at
        self.answers[state.call_id] = error_answer(exc_type, error.message)
        self._failed_calls[(exc_type, error.message)] = state
        self.counters.failed += 1
        state.result_text = state.due_at = None
        self._journal(state)
        self.run.events.emit(
            CallFailed(self.execution_id, state.call_id, state.function, state.attempts, last_message(error.traceback))
        )

    # -- timers (retry backoff and durable sleeps) ------------------------------------------

    def _push_timer(self: Driver, due: float, state: CallState) -> None:
        heapq.heappush(self._timers, (due, next(self._timer_seq), state.call_id))

    def _fire_timers(self: Driver) -> None:
        now = time.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, call_id = heapq.heappop(self._timers)
            state = self.calls[call_id]
            if state.kind == "sleep":
                state.status, state.result_text = "done", "null"
                state.finished_at = now
                self.answers[call_id] = {"return_value": None}
                self.counters.done += 1
                state.attempts = 1
                self._journal(state)
            elif state.status == "retrying":
                if state.due_at is None or state.due_at <= now:  # not an older timer of the call
                    state.due_at = None
                    self._to_dispatch.append(state)
            elif self._time_out(state, now):  # the attempt's deadline (limiting.py)
                continue
            else:  # a deadline of a signal wait or an external call (waits.py)
                self._wait_deadline(state, now)
        self._cancel_timed_out()
