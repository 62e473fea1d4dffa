"""Waits as components of the driver: durable sleeps, signals and external calls.

One component per kind of wait, each pending wait an object of its own (as Temporal's workers
have one handler per kind of job); they reach the loop only through :class:`~.components.Loop`.

- :class:`Sleeps`: ``asyncio.sleep`` and ``time.sleep`` in workflow code are durable timers, a call
  row of kind ``sleep`` whose ``due_at`` survives a restart.
- :class:`Signals`: ``signal(name, timeout=None)`` (never looked up in the namespace) is a call row
  of kind ``signal``, checkpointed like any call, answered with the value of the oldest unconsumed
  delivery of that name in the execution's mailbox. A timeout is a durable deadline (the row's
  ``due_at``) that raises ``TimeoutError`` in the workflow.
- :class:`Externals`: a call to a function marked :func:`~durable_monty_nb.signals.external` is
  published instead of dispatched: its hook gets a completion token and URL, and the completion
  arrives in the mailbox under the reserved name ``call:<id>:<attempt>``.
- :class:`Mailbox`: reads the mailbox for the signals and external calls, only while something
  waits: when a delivery of this process wakes the driver
  (:func:`~durable_monty_nb.store.mailbox.notify`), when a wait is announced or its deadline is
  due, and otherwise at the heartbeat cadence (deliveries of other processes). A delivery is
  marked consumed in the transaction that journals the wait's result (exactly once).
"""

from __future__ import annotations

import contextvars
import json
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ... import cpus
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
from .calls import PENDING, CallState
from .components import Component, Loop
from .exceptions import SANDBOX_EXCEPTIONS, error_answer

if TYPE_CHECKING:
    from ...store.signing import Signer
    from ...store.store import Store

EXTERNAL_WORKER = "external"


class Sleeps(Component):
    """Durable sleeps: a timer each, the call done when it fires."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop

    def announce(self, call_id: int, function: str, args: Any, awaited: bool) -> CallState:
        """A new sleep of ``args[0]`` seconds (``function``: ``asyncio.sleep`` or ``time.sleep``)."""
        seconds = float(args[0]) if args else 0.0
        due = self._loop.clock.now() + max(seconds, 0.0)
        state = CallState(call_id, function, "sleep", json.dumps([[seconds], {}]), awaited, "sleep", due_at=due)
        self._loop.register(state, sha256(f"sleep\0{call_id}"), due)
        self._loop.push_timer(due, state)
        return state

    def restore(self, state: CallState, now: float) -> bool:
        if state.kind != "sleep":
            return False
        self._loop.push_timer(state.due_at or now, state)
        return True

    def timer(self, state: CallState, now: float) -> bool:
        if state.kind != "sleep":
            return False
        if state.status is PENDING:  # else a timer of a sleep announced twice (the sandbox crashed between)
            state.finished_at, state.attempts = now, 1
            self._loop.book.transition_pending_done(state, "null", {"return_value": None})
        return True


@dataclass(slots=True, eq=False)
class SignalWait:
    """One pending ``signal(name)`` of the workflow."""

    state: CallState
    name: str


class Signals(Component):
    """Signal waits (see the module docstring)."""

    def __init__(self, loop: Loop, inbox: Mailbox, execution_id: str, signer: Signer) -> None:
        self._loop = loop
        self._inbox = inbox
        self._execution_id = execution_id
        self._signer = signer
        self._waits: dict[int, SignalWait] = {}  # by call id

    def count(self) -> int:
        return len(self._waits)

    def wait(self, call_id: int, name: str, timeout: float | None, awaited: bool) -> CallState:
        """A new wait of the workflow for the signal ``name`` (arguments of :func:`signal_arguments`)."""
        due = self._loop.clock.now() + timeout if timeout is not None else None
        arguments = json.dumps([[name], {"timeout": timeout} if timeout is not None else {}])
        state = CallState(call_id, SIGNAL_FUNCTION, "signal", arguments, awaited, "signal", None, due_at=due)
        self._loop.register(state, sha256(f"signal\0{self._execution_id}\0{call_id}"), due)
        self._add(state, name)
        return state

    def restore(self, state: CallState, now: float) -> bool:
        """A wait of the checkpoint without a journaled answer: wait again (same deadline)."""
        if state.kind != "signal":
            return False
        if state.due_at is None and (timeout := signal_timeout_of(state.args_text)) is not None:
            state.due_at = now + timeout  # a failed (timed out) wait tried again: a fresh deadline
        self._add(state, signal_name_of(state.args_text))
        return True

    def _add(self, state: CallState, name: str) -> None:
        self._waits[state.call_id] = SignalWait(state, name)
        if state.due_at is not None:
            self._loop.push_timer(state.due_at, state)
        self._inbox.expect()  # it may have been delivered already

    # -- what the mailbox asks (Reader) ------------------------------------------------------------

    def names(self) -> list[str]:
        return [wait.name for wait in self._waits.values()]

    def due(self, now: float) -> bool:
        return any(w.state.due_at is not None and w.state.due_at <= now for w in self._waits.values())

    def take(self, row: Any, now: float) -> int | None:
        """Give the delivery ``row`` to the earliest wait of its name; the call id, or None."""
        waiting = [call_id for call_id, wait in self._waits.items() if wait.name == row.name]
        if not waiting:
            return None
        state = self._waits.pop(min(waiting)).state
        state.attempts, state.started_at, state.finished_at = 1, row.created_at, now
        answer = {"return_value": self._loop.codec.decode_sandbox(row.value)}
        self._loop.book.transition_pending_done(state, row.value, answer)
        return state.call_id

    # -- hooks -----------------------------------------------------------------------------------

    def timer(self, state: CallState, now: float) -> bool:
        """The deadline of a wait: no signal came in time, the workflow gets a ``TimeoutError``."""
        if state.kind != "signal":
            return False
        wait = self._waits.get(state.call_id)
        if wait is None or state.status is not PENDING or state.due_at is None or state.due_at > now:
            return True
        del self._waits[state.call_id]
        timeout = signal_timeout_of(state.args_text)
        message = f"no signal {wait.name!r} arrived within {timeout:g} s" if timeout is not None else "timed out"
        state.attempts = 1
        text, answer = f"TimeoutError: {message}", error_answer("TimeoutError", message)
        self._loop.book.transition_pending_failed(state, "TimeoutError", message, text, now, answer)
        return True

    def waits(self) -> list[Wait]:
        """The pending waits, in call order (read by other threads)."""
        found = []
        for wait in sorted(list(self._waits.values()), key=lambda w: w.state.call_id):
            state = wait.state
            token = signal_token(self._signer, self._execution_id, wait.name)
            found.append(Wait(state.call_id, "signal", wait.name, state.due_at, 1, token))
        return found


@dataclass(slots=True, eq=False)
class ExternalWait:
    """One published attempt of an external call, until its completion (or deadline) comes."""

    state: CallState
    task: Task
    deadline: float | None

    @property
    def name(self) -> str:
        return call_signal_name(self.task.call_id, self.task.attempt)


class Externals(Component):
    """External calls (see the module docstring)."""

    def __init__(self, loop: Loop, inbox: Mailbox, execution_id: str, key: str, signer: Signer) -> None:
        self._loop = loop
        self._inbox = inbox
        self._execution_id = execution_id
        self._key = key
        self._signer = signer
        self._waits: dict[int, ExternalWait] = {}  # by call id: its current attempt

    def count(self) -> int:
        return len(self._waits)

    def holds(self, call_id: int) -> bool:
        """The call's attempt is published, not on the executor."""
        return call_id in self._waits

    def dispatch(self, state: CallState, now: float) -> bool:
        """Publish the call of an external function instead of dispatching it; False for others."""
        spec = external_spec(self._loop.function(state.function))
        if spec is None:
            return False
        local = self._loop.local_call(state)
        if local is None:
            return True  # failed (unknown function)
        attempt = state.attempts + 1
        task = Task(self._execution_id, state.call_id, attempt, state.function)
        task.started_at = now
        state.task, state.worker = task, EXTERNAL_WORKER
        deadline = now + spec.timeout if spec.timeout is not None else None
        self._waits[state.call_id] = ExternalWait(state, task, deadline)
        if deadline is not None:
            self._loop.push_timer(deadline, state)
        self._loop.book.journal(state)  # the worker column marks it external in the store (status views)
        self._inbox.expect()  # completed while this kernel was down?
        token = call_token(self._signer, self._execution_id, state.call_id, attempt)
        call = ExternalCall(
            self._execution_id,
            self._key,
            state.call_id,
            attempt,
            state.function,
            tuple(local.args),
            dict(local.kwargs),
            token,
            completion_url(token),
        )
        # An attempt published before a restart whose completion is already in: the hook is not
        # run again (it would submit the same job twice).
        completed = state.restored and self._inbox.holds(call_signal_name(state.call_id, attempt))
        if spec.hook is not None and not completed:
            self._run_hook(spec, call, task)
        return True

    def _run_hook(self, spec: ExternalSpec, call: ExternalCall, task: Task) -> None:
        report, clock = self._loop.report, self._loop.clock

        def run() -> None:
            cpus.unpin_this_thread()  # started by the driver, which may run on one CPU
            try:
                spec.hook(call)  # type: ignore[misc]
            except Exception as exc:  # the attempt fails; the retry policy decides
                text = "".join(traceback.format_exception(exc))
                outcome = Outcome(call.call_id, call.attempt, False, error=ErrorInfo.of(exc, text))
                outcome.started_at, outcome.finished_at = task.started_at, clock.now()
                report(outcome)

        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(run,), daemon=True, name=f"durable-hook-{call.call_id}").start()

    # -- what the mailbox asks (Reader) ------------------------------------------------------------

    def names(self) -> list[str]:
        return [wait.name for wait in self._waits.values()]

    def due(self, now: float) -> bool:
        return any(w.deadline is not None and w.deadline <= now for w in self._waits.values())

    def take(self, row: Any, now: float) -> int | None:
        """The completion ``row`` of a published attempt ends it; the call id, or None."""
        wait = self._by_name(row.name)
        if wait is None:
            return None
        task = wait.task
        payload = self._loop.codec.decode_host(row.value)
        if isinstance(payload, dict) and "error" in payload:
            error = payload["error"]
            info = _error_info(str(error.get("type") or "Exception"), str(error.get("message") or ""))
            outcome = Outcome(task.call_id, task.attempt, False, error=info)
        else:
            value = payload.get("value") if isinstance(payload, dict) else None
            outcome = Outcome(task.call_id, task.attempt, True, value=value)
        outcome.started_at, outcome.finished_at, outcome.worker = task.started_at, now, EXTERNAL_WORKER
        self._loop.settle(outcome)  # ends the wait (``ended``)
        return task.call_id

    def _by_name(self, name: str) -> ExternalWait | None:
        if not name.startswith("call:"):
            return None
        _, call_id, attempt = name.split(":")
        wait = self._waits.get(int(call_id))
        return wait if wait is not None and wait.task.attempt == int(attempt) else None

    # -- hooks -----------------------------------------------------------------------------------

    def ended(self, state: CallState) -> None:
        self._waits.pop(state.call_id, None)

    def timer(self, state: CallState, now: float) -> bool:
        """The deadline of a published attempt: not completed in time, it fails as a ``TimeoutError``."""
        wait = self._waits.get(state.call_id)
        if wait is None or wait.task is not state.task:
            return False
        if wait.deadline is None or wait.deadline > now:
            return True
        message = f"{state.function}() was not completed within its timeout"
        info = ErrorInfo(exception_types(TimeoutError), message, f"TimeoutError: {message}")
        task = wait.task
        outcome = Outcome(task.call_id, task.attempt, False, error=info, started_at=task.started_at, finished_at=now)
        self._loop.settle(outcome)
        return True

    def waits(self) -> list[Wait]:
        """The published attempts, in call order (read by other threads)."""
        found = []
        for wait in sorted(list(self._waits.values()), key=lambda w: w.task.call_id):
            task = wait.task
            token = call_token(self._signer, self._execution_id, task.call_id, task.attempt)
            found.append(Wait(task.call_id, "external", task.function, wait.deadline, task.attempt, token))
        return found


class Mailbox(Component):
    """The execution's mailbox, read for the signals and external calls (see the module docstring)."""

    def __init__(
        self,
        loop: Loop,
        store: Store,
        execution_id: str,
        heartbeat: float,
        on_delivery: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self._store = store
        self._execution_id = execution_id
        self._heartbeat = heartbeat
        self._on_delivery = on_delivery
        self.readers: list[Signals | Externals] = []
        self.check = False  # look at the next turn (something may have been delivered)
        self._last_poll = 0.0
        self._taken: set[int] = set()  # seqs handed out (consumed at the next commit)
        self._stop_listening = mailbox.listen(execution_id, self.notify)

    def notify(self) -> None:
        """A delivery to this execution was written (any thread): look at the mailbox now."""
        self.check = True
        if self._on_delivery is not None:
            self._on_delivery()
        self._loop.wake()

    def expect(self) -> None:
        """A wait began: it may have been delivered already."""
        self.check = True

    def holds(self, name: str) -> bool:
        """An unconsumed delivery of ``name`` is in the mailbox (False when the store is unreachable)."""
        try:
            return bool(mailbox.unconsumed(self._store, self._execution_id, [name]))
        except Exception:  # publishing again is the safe side
            return False

    def before_timers(self, now: float) -> None:
        """Hand unconsumed deliveries to the waits of their names (oldest to the earliest wait)."""
        names = [name for reader in self.readers for name in reader.names()]
        if not names:
            return
        due = any(reader.due(now) for reader in self.readers)  # read before a deadline fires
        if not (self.check or due or now - self._last_poll >= self._heartbeat):
            return
        self.check = False
        self._last_poll = now
        for row in mailbox.unconsumed(self._store, self._execution_id, names):
            if row.seq in self._taken:
                continue
            for reader in self.readers:
                call_id = reader.take(row, now)
                if call_id is not None:
                    self._taken.add(row.seq)
                    self._loop.consume(row.seq, call_id)
                    break

    def close(self) -> None:
        self._stop_listening()


@dataclass
class Waits:
    """The wait components of one driver, wired together (:func:`wait_components`)."""

    sleeps: Sleeps
    signals: Signals
    externals: Externals
    mailbox: Mailbox

    def waits(self) -> list[Wait]:
        """What the execution waits for from outside, in call order (signals first)."""
        return [*self.signals.waits(), *self.externals.waits()]

    def outside(self) -> int:
        """Waits only something outside the run ends (signals, external completions)."""
        return self.signals.count() + self.externals.count()


def wait_components(
    loop: Loop, store: Store, execution_id: str, key: str, heartbeat: float, on_delivery: Callable[[], None]
) -> Waits:
    inbox = Mailbox(loop, store, execution_id, heartbeat, on_delivery)
    waits = Waits(
        Sleeps(loop),
        Signals(loop, inbox, execution_id, store.signer),
        Externals(loop, inbox, execution_id, key, store.signer),
        inbox,
    )
    inbox.readers = [waits.signals, waits.externals]
    return waits


def signal_arguments(args: Any, kwargs: Any) -> tuple[str, float | None]:
    """The name and timeout of ``signal(name, timeout=None)``; TypeError or SignalError when wrong."""
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


SIGNAL_ERRORS = (TypeError, SignalError)  # what a wrong signal(...) raises


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
