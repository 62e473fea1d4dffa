"""Waits resolved from outside: durable signals and external calls.

``signal(name, timeout=None)`` in workflow code is intercepted here (never looked up in the
namespace): it becomes a call row of kind ``signal``, checkpointed like any call, whose answer
is the value of the oldest unconsumed delivery of that name in the execution's mailbox. A
timeout is a durable deadline (the row's ``due_at``, like a sleep) that raises ``TimeoutError``
in the workflow.

A call to a function marked :func:`~durable_monty_nb.signals.external` is published instead of
dispatched: its hook gets a completion token and URL, and the completion arrives in the mailbox
under the reserved name ``call:<id>:<attempt>``.

The mailbox is read only while something waits: when a delivery of this process wakes the
driver (:func:`~durable_monty_nb.store.mailbox.notify`), when a wait is announced or a deadline
is due, and otherwise at the heartbeat cadence (deliveries of other processes). A delivery is
marked consumed in the transaction that journals the wait's result (exactly once).
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from pydantic_monty import FunctionSnapshot

from ...executors.base import ErrorInfo, Outcome, Task, exception_types
from ...signals import (
    SIGNAL_FUNCTION,
    ExternalCall,
    ExternalSpec,
    Wait,
    completion_url,
    external_spec,
    signal_name_of,
    signal_timeout_of,
)
from ...store import mailbox
from ...store.mailbox import SignalError, call_signal_name, check_name
from ...tokens import call_token, signal_token
from ..fingerprint import sha256
from .calls import PENDING, PHANTOM, RETRYING, CallState
from .exceptions import SANDBOX_EXCEPTIONS, error_answer
from .scheduling import WAKE

if TYPE_CHECKING:
    from .loop import Driver

EXTERNAL_WORKER = "external"


class Waits:
    """Mixin of :class:`Driver`: signal waits and external calls."""

    def _init_waits(self: Driver) -> None:
        self._signal_waits: dict[int, str] = {}  # call id -> signal name
        self._external_waits: dict[int, tuple[int, float | None]] = {}  # call id -> (attempt, deadline)
        self._mailbox_check = False
        self._last_mailbox_poll = 0.0
        self._taken_seqs: set[int] = set()
        self.parked = False  # blocked on waits only (views and magics stop blocking the cell)
        self._stop_listening = mailbox.listen(self.execution_id, self.notify_delivery)

    # -- from other threads ----------------------------------------------------------------------

    def _note_parked(self: Driver) -> None:
        """Before blocking: is the run parked, waiting for nothing but signals and external completions?"""
        parked = False
        if self._mailbox_check and (self._signal_waits or self._external_waits):
            self._outcomes.put(WAKE)  # a delivery may be waiting already: look before blocking
            self.parked = False
            return
        waiting = self._signal_waits or self._external_waits
        if waiting and not self._to_dispatch and self._in_flight <= len(self._external_waits):
            calls = self.calls
            parked = not any(
                calls[cid].status is RETRYING or (calls[cid].kind == "sleep" and calls[cid].status is PENDING)
                for _, _, cid in self._timers
            )
        self.parked = parked
        if parked:  # hours, maybe: leave the interpreter's thread switching alone meanwhile
            self._end_switching()
        else:
            self._begin_switching()

    def notify_delivery(self: Driver) -> None:
        """A delivery to this execution was written: look at the mailbox now."""
        self._mailbox_check = True
        self.parked = False  # active again until the driver has looked (a waiting cell keeps waiting)
        self._outcomes.put(WAKE)

    def waits(self: Driver) -> list[Wait]:
        """What the execution waits for from outside, in call order."""
        found = []
        signer = self.store.signer
        for call_id, name in sorted(self._signal_waits.items()):
            state = self.calls.get(call_id)
            due = state.due_at if state is not None else None
            found.append(Wait(call_id, "signal", name, due, 1, signal_token(signer, self.execution_id, name)))
        for call_id, (attempt, deadline) in sorted(self._external_waits.items()):
            state = self.calls.get(call_id)
            if state is None or state.task is None or state.task.attempt != attempt:
                continue  # that attempt ended (its hook failed); the next one is published anew
            function = state.function if state is not None else "?"
            token = call_token(signer, self.execution_id, call_id, attempt)
            found.append(Wait(call_id, "external", function, deadline, attempt, token))
        return found

    def deliver(
        self: Driver, signal: str, value: Any = None, *, idempotency_key: str | None = None, source: str = "widget"
    ) -> mailbox.Delivery:
        """Deliver a signal to this execution (the widget's buttons use it)."""
        from ...signals import deliver_signal

        row = self.store.get_execution(self.execution_id)
        return deliver_signal(
            self.store,
            self.execution_id,
            signal,
            value,
            idempotency_key=idempotency_key,
            source=source,
            execution=row,
        )

    # -- signal(...) in the workflow -----------------------------------------------------------------

    def _announce_signal(self: Driver, snap: FunctionSnapshot) -> tuple[CallState, dict[str, Any] | None]:
        try:
            name, timeout = _signal_arguments(snap.args, snap.kwargs)
        except (TypeError, SignalError) as exc:
            return PHANTOM, {"exc_type": "TypeError", "message": str(exc)}
        position = snap.position
        self._reach_site(position)
        awaited = self.info.is_awaited(position.start, position.end) if position.filename.endswith("-1>") else None
        if awaited is None:
            awaited = snap.allow_eager_await
        now = time.time()
        due = now + timeout if timeout is not None else None
        arguments = json.dumps([[name], {"timeout": timeout} if timeout is not None else {}])
        call_id = self._host_id(snap.call_id)  # gathers.py
        state = CallState(call_id, SIGNAL_FUNCTION, "signal", arguments, awaited, "signal", None, due_at=due)
        self._register(state, call_key=sha256(f"signal\0{self.execution_id}\0{call_id}"), due_at=due)
        self._signal_waits[call_id] = name
        if due is not None:
            self._push_timer(due, state)
        self._mailbox_check = True  # it may have been delivered already
        return state, None

    def _restore_wait(self: Driver, state: CallState, now: float) -> None:
        """A signal wait of the checkpoint without a journaled answer: wait again (same deadline)."""
        name = signal_name_of(state.args_text)
        self._signal_waits[state.call_id] = name
        if state.due_at is None and (timeout := signal_timeout_of(state.args_text)) is not None:
            state.due_at = now + timeout  # a failed (timed out) wait tried again: a fresh deadline
        if state.due_at is not None:
            self._push_timer(state.due_at, state)
        self._mailbox_check = True

    # -- the mailbox -----------------------------------------------------------------------------

    def _take_deliveries(self: Driver) -> None:
        """Hand unconsumed deliveries to the waits of their names (oldest to the earliest wait)."""
        for call_id, (attempt, _) in list(self._external_waits.items()):
            task = self.calls[call_id].task
            if task is None or task.attempt != attempt:  # that attempt ended (its hook failed, ...)
                del self._external_waits[call_id]
        if not self._signal_waits and not self._external_waits:
            return
        now = time.time()
        due = bool(self._timers) and self._timers[0][0] <= now
        if not (self._mailbox_check or due or now - self._last_mailbox_poll >= self.settings.heartbeat):
            return
        self._mailbox_check = False
        self._last_mailbox_poll = now
        externals = {call_signal_name(cid, attempt): cid for cid, (attempt, _) in self._external_waits.items()}
        rows = mailbox.unconsumed(self.store, self.execution_id, [*self._signal_waits.values(), *externals])
        for row in rows:
            if row.seq in self._taken_seqs:
                continue
            if row.name in externals:
                self._complete_external(externals.pop(row.name), row, now)
                continue
            waiting = [cid for cid, name in self._signal_waits.items() if name == row.name]
            if not waiting:
                continue
            call_id = min(waiting)
            del self._signal_waits[call_id]
            self._taken_seqs.add(row.seq)
            self.step.consumed_signals.append((row.seq, call_id))
            state = self.calls[call_id]
            state.attempts, state.started_at, state.finished_at = 1, row.created_at, now
            self.book.transition_pending_done(state, row.value, {"return_value": self.codec.decode_sandbox(row.value)})

    def _wait_deadline(self: Driver, state: CallState, now: float) -> None:
        """A timer of a wait fired: a signal or an external attempt not answered in time."""
        call_id = state.call_id
        if state.kind == "signal" and call_id in self._signal_waits and state.status is PENDING:
            if state.due_at is None or state.due_at > now:
                return
            name = self._signal_waits.pop(call_id)
            timeout = signal_timeout_of(state.args_text)
            message = f"no signal {name!r} arrived within {timeout:g} s" if timeout is not None else "timed out"
            state.attempts = 1
            answer = error_answer("TimeoutError", message)
            self.book.transition_pending_failed(state, "TimeoutError", message, f"TimeoutError: {message}", now, answer)
            return
        found = self._external_waits.get(call_id)
        if found is None or state.task is None or state.task.attempt != found[0]:
            return
        attempt, deadline = found
        if deadline is None or deadline > now:
            return
        del self._external_waits[call_id]
        message = f"{state.function}() was not completed within its timeout"
        info = ErrorInfo(exception_types(TimeoutError), message, f"TimeoutError: {message}")
        self._collect([Outcome(call_id, attempt, False, error=info, started_at=state.task.started_at, finished_at=now)])

    # -- external calls --------------------------------------------------------------------------

    def _dispatch_external(self: Driver, state: CallState) -> bool:
        """Publish the call of an external function instead of dispatching it; False for others."""
        spec = external_spec(self._function(state.function))
        if spec is None:
            return False
        local = self._local_call(state)
        if local is None:
            return True  # failed (unknown function)
        attempt = state.attempts + 1
        now = time.time()
        task = Task(self.execution_id, state.call_id, attempt, state.function)
        task.started_at = now
        state.task, state.worker = task, EXTERNAL_WORKER
        self._in_flight += 1
        deadline = now + spec.timeout if spec.timeout is not None else None
        self._external_waits[state.call_id] = (attempt, deadline)
        if deadline is not None:
            self._push_timer(deadline, state)
        self.book.journal(state)  # the worker column marks it external in the store (status views)
        self._mailbox_check = True  # completed while this kernel was down?
        token = call_token(self.store.signer, self.execution_id, state.call_id, attempt)
        call = ExternalCall(
            self.execution_id,
            self.key,
            state.call_id,
            attempt,
            state.function,
            tuple(local.args),
            dict(local.kwargs),
            token,
            completion_url(token),
        )
        if spec.hook is not None and not self._completed_while_down(state, attempt):
            self._run_hook(spec, call, task)
        return True

    def _completed_while_down(self: Driver, state: CallState, attempt: int) -> bool:
        """An attempt published before a restart whose completion is already in the mailbox: the
        completion is taken, the hook is not run again (it would submit the same job twice)."""
        if not state.restored:
            return False
        try:
            return bool(mailbox.unconsumed(self.store, self.execution_id, [call_signal_name(state.call_id, attempt)]))
        except Exception:  # the store is unreachable: publishing again is the safe side
            return False

    def _run_hook(self: Driver, spec: ExternalSpec, call: ExternalCall, task: Task) -> None:
        def run() -> None:
            try:
                spec.hook(call)  # type: ignore[misc]
            except Exception as exc:  # the attempt fails; the retry policy decides
                text = "".join(traceback.format_exception(exc))
                self._outcomes.put(
                    Outcome(
                        call.call_id,
                        call.attempt,
                        False,
                        error=ErrorInfo.of(exc, text),
                        started_at=task.started_at,
                        finished_at=time.time(),
                    )
                )

        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(run,), daemon=True, name=f"durable-hook-{call.call_id}").start()

    def _complete_external(self: Driver, call_id: int, row: Any, now: float) -> None:
        attempt, _ = self._external_waits.pop(call_id)
        state = self.calls[call_id]
        if state.task is None or state.task.attempt != attempt:
            return
        self._taken_seqs.add(row.seq)
        self.step.consumed_signals.append((row.seq, call_id))
        payload = self.codec.decode_host(row.value)
        started = state.task.started_at
        if isinstance(payload, dict) and "error" in payload:
            error = payload["error"]
            info = _error_info(str(error.get("type") or "Exception"), str(error.get("message") or ""))
            outcome = Outcome(
                call_id, attempt, False, error=info, started_at=started, finished_at=now, worker=EXTERNAL_WORKER
            )
        else:
            value = payload.get("value") if isinstance(payload, dict) else None
            outcome = Outcome(
                call_id, attempt, True, value=value, started_at=started, finished_at=now, worker=EXTERNAL_WORKER
            )
        self._collect([outcome])


def _signal_arguments(args: Any, kwargs: Any) -> tuple[str, float | None]:
    args, kwargs = list(args or ()), dict(kwargs or {})
    if len(args) > 2 or set(kwargs) - {"name", "timeout"}:
        raise TypeError("signal() takes a name and an optional timeout: signal(name, timeout=None)")
    if "name" in kwargs:
        args.insert(0, kwargs.pop("name"))
    if not args:
        raise TypeError("signal() needs the name of the signal: signal('approval')")
    name = check_name(args[0])
    timeout = args[1] if len(args) > 1 else kwargs.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise TypeError(f"the timeout of signal() is a number of seconds or None, not {timeout!r}")
    return name, None if timeout is None else float(timeout)


def _error_info(type_name: str, message: str) -> ErrorInfo:
    """An error reported by an external system, by name (builtin names keep their class)."""
    import builtins

    cls = getattr(builtins, type_name, None)
    if type_name in SANDBOX_EXCEPTIONS and isinstance(cls, type) and issubclass(cls, BaseException):
        types = exception_types(cls)
        text = f"{type_name}: {message}"
    else:
        types = (f"external.{type_name}", "builtins.Exception", "builtins.BaseException")
        message = f"{type_name}: {message}"
        text = message
    return ErrorInfo(types, message, text)
