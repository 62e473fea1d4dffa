"""The driver: one thread that owns a Monty session and drives one execution to its end.

Each turn of the loop:

1. **advance** Monty until it blocks: answer name lookups from the namespace, answer awaited
   calls with futures (they run concurrently), feed ready results in batches, serve calls from
   the journal (after a restore) or from earlier executions of the same key (reuse);
2. **commit** one transaction: the results received, the new call rows and, when calls were
   announced, the snapshot that names them (checkpoint before dispatch);
3. **dispatch** the new calls to the executor, then **wait** for outcomes, timers or a stop.

Nothing is dispatched before the checkpoint naming it is committed, and a result reaches the
store in the same transaction as any state that depends on it, so a restart from the latest
checkpoint re-runs only the calls that had no committed result.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import inspect
import itertools
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic_monty import (
    FunctionSnapshot,
    FutureSnapshot,
    MontyComplete,
    MontyCrashedError,
    MontyError,
    MontyRuntimeError,
    MontySession,
    NameLookupSnapshot,
)

from ..errors import DurableError, LeaseLost, ValueCrossingError, WorkflowFailed, last_line
from ..executors.base import Outcome, Task
from ..executors.threads import ThreadExecutor
from ..store.store import Step, Store
from ..values import SCALARS, ValueCodec, format_arguments
from . import sandbox
from .analysis import CodeInfo
from .events import CallFailed, CallRetrying, ExecutionFinished, Printed
from .fingerprint import function_fingerprint, sha256
from .handle import Progress, Run, interrupted_error
from .retry import RetryPolicy, policy_for

RESUME_BATCH = 1000
DRAIN_LIMIT = 5000
MAX_WORKER_CRASHES = 3
SLEEP_FUNCTIONS = ("asyncio.sleep", "time.sleep")
_WAKE = object()

# Exception types Monty can raise inside the sandbox by name (see pydantic_monty.ExcType).
_SANDBOX_EXCEPTIONS = frozenset(
    (
        "Exception",
        "BaseException",
        "ArithmeticError",
        "OverflowError",
        "ZeroDivisionError",
        "LookupError",
        "IndexError",
        "KeyError",
        "RuntimeError",
        "NotImplementedError",
        "RecursionError",
        "AttributeError",
        "NameError",
        "UnboundLocalError",
        "ValueError",
        "UnicodeDecodeError",
        "UnicodeEncodeError",
        "ImportError",
        "ModuleNotFoundError",
        "OSError",
        "FileNotFoundError",
        "FileExistsError",
        "IsADirectoryError",
        "NotADirectoryError",
        "PermissionError",
        "AssertionError",
        "MemoryError",
        "StopIteration",
        "SyntaxError",
        "TimeoutError",
        "TypeError",
    )
)


@dataclass(slots=True, eq=False)
class CallState:
    """What the driver knows of one call."""

    call_id: int
    function: str
    kind: str  # call | sleep
    args_text: str
    awaited: bool
    fingerprint: str = ""
    sandbox_args: Any = None  # (args, kwargs) as the sandbox gave them; None after a restore
    status: str = "pending"  # pending | retrying | done | failed
    attempts: int = 0
    result_text: str | None = None
    error_text: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    due_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    restored: bool = False
    reused: bool = False
    task: Task | None = None

    @property
    def args_repr(self) -> str:
        return format_arguments(self.args_text)

    @property
    def view_status(self) -> str:
        if self.reused:
            return "reused"
        if self.status == "pending":
            if self.kind == "sleep":
                return "waiting"
            if self.task is not None:
                return "running" if self.task.started_at else "queued"
        return self.status

    @property
    def error_summary(self) -> str | None:
        return last_line(self.error_text) or None

    def journaled_answer(self, codec: ValueCodec) -> dict[str, Any] | None:
        """What Monty gets for a call whose outcome is in the journal (None when it has none)."""
        if self.status == "done":
            return {"return_value": codec.decode_sandbox(self.result_text)}
        if self.status == "failed":
            return _error_answer(self.error_type, self.error_message)
        return None


@dataclass
class Settings:
    """How the driver runs calls."""

    workers: int = 32
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lease_ttl: float = 30.0

    @property
    def heartbeat(self) -> float:
        return self.lease_ttl / 3


@dataclass
class Counters:
    total: int = 0
    done: int = 0
    failed: int = 0
    restored: int = 0
    reused: int = 0


class Driver:
    """Drives one execution in its own thread; see the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        codec: ValueCodec,
        info: CodeInfo,
        run: Run,
        owner: str,
        namespace: dict[str, Any],
        inputs: dict[str, Any],
        settings: Settings,
        session: MontySession,
        snapshot: Any,
        restored_calls: list[Any] | None = None,
        retry_failed: bool = False,
        reuse_key: str | None = None,
        on_exit: Callable[[Driver], None] | None = None,
    ) -> None:
        self.store = store
        self.codec = codec
        self.info = info
        self.run = run
        run._driver = self
        self.execution_id = run.execution_id
        self.key = run.key
        self.owner = owner
        self.namespace = namespace
        self.inputs = inputs
        self.settings = settings
        self.session = session
        self._snapshot = snapshot
        self.reuse_key = reuse_key
        self._on_exit = on_exit

        self.calls: dict[int, CallState] = {}
        self.answers: dict[int, dict[str, Any]] = {}
        self.counters = Counters()
        self.step = Step(execution={"status": "running", "finished_at": None})
        self._announced: list[CallState] = []
        self._new_rows: dict[int, dict[str, Any]] = {}
        self._to_reuse: list[CallState] = []
        self._to_dispatch: list[CallState] = []
        self._timers: list[tuple[float, int, int]] = []
        self._timer_seq = itertools.count()
        self._outcomes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_flight = 0
        self._executor = ThreadExecutor(settings.workers, name=f"durable-{self.key[:20]}")
        self._functions: dict[str, tuple[str, bool]] = {}
        self._callables: dict[str, Callable[..., Any]] = {}
        self._failed_calls: dict[tuple[str, str], CallState] = {}
        self._stopping = False
        self._finished = False
        self._state_lock = threading.Lock()
        self._last_commit = 0.0
        self._crashes = 0
        self._thread: threading.Thread | None = None
        self._go = threading.Event()
        if restored_calls is not None:
            self._restore_calls(restored_calls, retry_failed)

    # -- public (called from other threads) ----------------------------------------------

    def start(self, paused: bool = False) -> None:
        """Run in a thread of its own; with ``paused``, dispatch nothing until ``begin()``."""
        if not paused:
            self._go.set()
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._main,), daemon=True, name=f"durable-driver-{self.key[:30]}"
        )
        self._thread.start()

    def begin(self) -> None:
        self._go.set()

    def request_stop(self) -> None:
        with self._state_lock:
            self._stopping = True
        self._go.set()
        self._outcomes.put(_WAKE)

    def reactivate(self) -> bool:
        """Undo a stop request; False when the driver already finished."""
        with self._state_lock:
            if self._finished:
                return False
            self._stopping = False
        self._outcomes.put(_WAKE)
        return True

    def progress(self) -> Progress:
        c = self.counters
        running = self._executor.running
        retrying = waiting = 0
        if self._timers:
            for state in list(self.calls.values()):
                if state.status == "retrying":
                    retrying += 1
                elif state.kind == "sleep" and state.status == "pending":
                    waiting += 1
        queued = max(self._in_flight - running, 0)
        return Progress(
            total=c.total,
            done=c.done,
            failed=c.failed,
            running=min(running, self._in_flight),
            queued=queued,
            retrying=retrying,
            waiting=waiting,
            restored=c.restored,
            reused=c.reused,
        )

    def call_states(self) -> list[CallState]:
        return list(self.calls.values())

    def _release_memory(self) -> None:
        """After the end only the call list stays (for views); drop values and sandbox state."""
        self.answers.clear()
        self.inputs.clear()
        self.codec.objects.clear()
        for state in self.calls.values():
            state.sandbox_args = None
            state.task = None

    # -- the loop ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._go.wait()
            self._loop(self._snapshot)
        except LeaseLost as exc:
            self._finish_run("interrupted", error=exc, commit=False)
        except DurableError as exc:  # e.g. a tampered row: stop, keep the execution resumable
            self._finish_run("interrupted", error=exc)
        except Exception as exc:  # an engine bug must not leave the handle waiting forever
            import traceback

            text = "".join(traceback.format_exception(exc))
            self._record_failure(
                f"internal error in durable-monty-nb:\n{text}",
                type(exc).__name__,
                WorkflowFailed(f"internal error: {exc}", text, self.execution_id, type(exc).__name__),
            )
        finally:
            sandbox.close_session(self.session)
            self._executor.shutdown()
            self._release_memory()
            if self._on_exit is not None:
                self._on_exit(self)

    def _loop(self, snap: Any) -> None:
        while True:
            try:
                snap = self._advance(snap)
            except MontyCrashedError as exc:
                snap = self._recover_from_crash(exc)
                continue
            except MontyRuntimeError as exc:
                self._fail(exc)
                return
            if type(snap) is MontyComplete:
                self._complete(snap)
                return
            self._commit(snap)
            with self._state_lock:
                if self._stopping and self._in_flight == 0:
                    self._finished = True
            if self._finished:
                self._finish_run("interrupted", error=interrupted_error(self.execution_id, self.key))
                return
            if not self._stopping:
                self._dispatch()
            self._collect(self._wait())
            if not self._stopping:
                self._fire_timers()

    def _advance(self, snap: Any) -> Any:
        """Run Monty until it needs something that is not ready yet (or completes)."""
        while True:
            kind = type(snap)
            if kind is FunctionSnapshot:
                if snap.is_os_function:
                    next_snap = self._os_call(snap)
                    if next_snap is not None:
                        snap = next_snap
                        continue
                else:
                    if snap.call_id not in self.calls:
                        state, answer = self._announce(snap)
                        if answer is not None:
                            snap = snap.resume(answer)
                            continue
                        if state.awaited:
                            snap = snap.resume({"future": ...})
                            continue
                    answer = self.answers.pop(snap.call_id, None)
                    if answer is not None:
                        snap = snap.resume(answer)
                        continue
            elif kind is FutureSnapshot:
                ready = self._ready(snap) if self.answers else None
                if ready:
                    snap = snap.resume(ready)
                    continue
            elif kind is NameLookupSnapshot:
                snap = self._lookup(snap)
                continue
            else:
                return snap
            # Blocked. Calls an earlier execution of the key completed need not wait.
            if not self._reuse_pending():
                return snap

    def _ready(self, snap: FutureSnapshot) -> dict[int, dict[str, Any]]:
        """Up to RESUME_BATCH answers for calls the snapshot waits on (never others:
        resuming a call id that is not pending would consume the snapshot)."""
        pending = snap.pending_call_ids
        answers = self.answers
        if len(answers) < len(pending):
            pending_set = set(pending)
            ids = [c for c in answers if c in pending_set]
        else:
            ids = [c for c in pending if c in answers]
        return {c: answers.pop(c) for c in ids[:RESUME_BATCH]}

    # -- what Monty asks for ----------------------------------------------------------------

    def _announce(self, snap: FunctionSnapshot) -> tuple[CallState, dict[str, Any] | None]:
        """Register a new external call. Returns an immediate answer for calls that cannot run."""
        name = snap.function_name
        fn = self._function(name)
        if fn is None:
            return _PHANTOM, {
                "exc_type": "NameError",
                "message": f"name {name!r} is not defined (not a function of the namespace)",
            }
        position = snap.position
        awaited = self.info.is_awaited(position.start, position.end) if position.filename.endswith("-1>") else None
        if awaited is None:
            awaited = snap.allow_eager_await
        fingerprint, is_coroutine = self._describe_function(name, fn)
        if is_coroutine:
            awaited = True
        args, kwargs = snap.args, snap.kwargs
        try:
            args_text = self.codec.encode_arguments(args, kwargs, what=f"an argument of {name}()")
        except ValueCrossingError as exc:
            return _PHANTOM, {"exc_type": "TypeError", "message": str(exc)}
        state = CallState(snap.call_id, name, "call", args_text, awaited, fingerprint, (args, kwargs))
        self._register(state, call_key=sha256(f"{name}\0{fingerprint}\0{args_text}"))
        if self.reuse_key is not None:
            self._to_reuse.append(state)
        else:
            self._to_dispatch.append(state)
        return state, None

    def _register(self, state: CallState, call_key: str, due_at: float | None = None) -> None:
        self.calls[state.call_id] = state
        self._announced.append(state)
        self.counters.total += 1
        row = {
            "execution_id": self.execution_id,
            "call_id": state.call_id,
            "exec_key": self.key,
            "function": state.function[:255],
            "kind": state.kind,
            "fingerprint": state.fingerprint,
            "args": state.args_text,
            "call_key": call_key,
            "status": "pending",
            "attempts": 0,
            "due_at": due_at,
            "result": None,
            "reused_from": None,
        }
        self.step.new_calls.append(row)
        self._new_rows[state.call_id] = row

    def _os_call(self, snap: FunctionSnapshot) -> Any:
        """Sleeps become durable timers; other OS calls get Monty's default behaviour."""
        name = snap.function_name
        if name not in SLEEP_FUNCTIONS:
            return snap.resume_not_handled()
        state = self.calls.get(snap.call_id)
        if state is None:
            seconds = float(snap.args[0]) if snap.args else 0.0
            due = time.time() + max(seconds, 0.0)
            state = CallState(
                snap.call_id, name, "sleep", json.dumps([[seconds], {}]), name == "asyncio.sleep", "sleep", due_at=due
            )
            self._register(state, call_key=sha256(f"sleep\0{snap.call_id}"), due_at=due)
            self._push_timer(due, state)
            if state.awaited:
                return snap.resume({"future": ...})
        answer = self.answers.pop(snap.call_id, None)
        return None if answer is None else snap.resume(answer)

    def _lookup(self, snap: NameLookupSnapshot) -> Any:
        name = snap.variable_name
        if snap.object_id is not None:
            return snap.resume()  # attributes of a handle: AttributeError in the sandbox
        if name in self.inputs:
            return snap.resume(value=self.inputs[name])
        if name not in self.namespace:
            return snap.resume()
        value = self.namespace[name]
        if is_function_like(value):
            self._callables[getattr(value, "__name__", name)] = value
            return snap.resume(value=value)
        try:
            _, sandbox_value = self.codec.encode(value, what=f"the notebook variable {name!r}")
        except ValueCrossingError:
            return snap.resume()
        self.inputs[name] = sandbox_value
        return snap.resume(value=sandbox_value)

    def _function(self, name: str) -> Callable[..., Any] | None:
        fn = self.namespace.get(name)
        if fn is None or not callable(fn):
            fn = self._callables.get(name)
        return fn

    def _describe_function(self, name: str, fn: Any) -> tuple[str, bool]:
        """(fingerprint, is a coroutine function), computed once per function of the run."""
        found = self._functions.get(name)
        if found is None:
            found = self._functions[name] = (function_fingerprint(fn), inspect.iscoroutinefunction(fn))
        return found

    # -- reuse across executions of one key ---------------------------------------------------

    def _reuse_pending(self) -> bool:
        """Serve the announced calls that an earlier execution of the key completed.

        Returns True when at least one call got an answer.
        """
        states, self._to_reuse = self._to_reuse, []
        if not states:
            return False
        rows = self._new_rows
        found = self.store.reusable_results(self.reuse_key or "", [rows[s.call_id]["call_key"] for s in states])
        served = False
        for state in states:
            row = rows[state.call_id]
            hit = found.get(row["call_key"])
            if hit is None:
                self._to_dispatch.append(state)
                continue
            state.status, state.reused, state.result_text = "done", True, hit.result
            row.update(status="done", result=hit.result, reused_from=hit.execution_id, attempts=0)
            self.answers[state.call_id] = state.journaled_answer(self.codec)  # type: ignore[assignment]
            self.counters.done += 1
            self.counters.reused += 1
            served = True
        return served

    # -- restore ----------------------------------------------------------------------------

    def _restore_calls(self, rows: list[Any], retry_failed: bool) -> None:
        now = time.time()
        verify = self.store.verify_call_fields
        for row in rows:  # unpacked: attribute access on 10,000 rows costs more than all the rest
            (
                call_id,
                function,
                kind,
                args,
                fingerprint,
                status,
                attempts,
                result,
                error,
                error_type,
                error_message,
                result_sig,
                due_at,
                started_at,
                finished_at,
                reused_from,
            ) = row
            if status in ("done", "failed"):
                verify(
                    self.execution_id, call_id, function, (status, result, error, error_type, error_message), result_sig
                )
            state = CallState(
                call_id,
                function,
                kind,
                args,
                True,
                fingerprint,
                None,
                status,
                attempts,
                result,
                error,
                error_type,
                error_message,
                due_at,
                started_at,
                finished_at,
                True,
                reused_from is not None,
            )
            self.calls[call_id] = state
            self.counters.total += 1
            if status == "done" or (status == "failed" and not retry_failed):
                self.answers[call_id] = state.journaled_answer(self.codec)  # type: ignore[assignment]
                if status == "done":
                    self.counters.done += 1
                    self.counters.restored += 1
                else:
                    self.counters.failed += 1
                    self._failed_calls[(error_type or "", error_message or "")] = state
            elif kind == "sleep":
                self._push_timer(due_at or now, state)
            elif status == "retrying" and due_at and due_at > now:
                self._push_timer(due_at, state)
            else:
                if status == "failed":  # a fresh try after a fix: the policy starts over
                    state.attempts = 0
                state.status = "pending"
                self._to_dispatch.append(state)

    def _recover_from_crash(self, exc: MontyCrashedError) -> Any:
        """The sandbox worker died: reload the latest checkpoint in a new worker."""
        self._crashes += 1
        if self._crashes > MAX_WORKER_CRASHES:
            raise DurableError(f"the Monty worker crashed {self._crashes} times; last: {exc}") from exc
        for state in self._announced:  # not checkpointed: Monty will announce them again
            self.calls.pop(state.call_id, None)
            self.counters.total -= 1
        announced = {s.call_id for s in self._announced}
        self.step.new_calls = [r for r in self.step.new_calls if r["call_id"] not in announced]
        self._new_rows = {k: v for k, v in self._new_rows.items() if k not in announced}
        self._to_dispatch = [s for s in self._to_dispatch if s.call_id not in announced]
        self._to_reuse = []
        self._announced = []
        self._commit(None)
        sandbox.close_session(self.session)
        self.session = sandbox.open_session()
        data = self.store.load_checkpoint(self.execution_id)
        for state in self.calls.values():
            answer = state.journaled_answer(self.codec)
            if answer is not None:
                self.answers[state.call_id] = answer
        if data is None:
            self.session.feed_start(sandbox.PRELUDE)
            return self.session.feed_start(self.info.code, print_callback=self._print)
        return self.session.load_snapshot(data, print_callback=self._print)

    # -- commit and dispatch ------------------------------------------------------------------

    def _commit(self, blocked_snapshot: Any) -> None:
        step = self.step
        if self._announced and blocked_snapshot is not None:
            step.checkpoint = blocked_snapshot.dump()
            self._announced = []
        idle = not step and not self.codec.pending_blobs
        if idle and time.time() - self._last_commit < self.settings.heartbeat:
            return
        self._write_step()

    def _write_step(self) -> None:
        """Commit the pending step (with the counters and any new blobs) and start a new one."""
        if self.codec.pending_blobs:
            self.step.blobs, self.codec.pending_blobs = self.codec.pending_blobs, {}
        self.step.execution.update(self._counter_columns())
        self.store.commit(self.execution_id, self.owner, self.settings.lease_ttl, self.step)
        self._last_commit = time.time()
        self.step = Step()
        self._new_rows = {}

    def _counter_columns(self) -> dict[str, int]:
        c = self.counters
        return {"calls_total": c.total, "calls_done": c.done, "calls_failed": c.failed, "calls_reused": c.reused}

    def _dispatch(self) -> None:
        states, self._to_dispatch = self._to_dispatch, []
        for state in states:
            self._submit(state)

    def _submit(self, state: CallState) -> None:
        fn = self._function(state.function)
        if fn is None:
            self._settle_failure(
                state,
                NameError(f"name {state.function!r} is not defined"),
                f"NameError: {state.function!r} is not defined in the namespace",
                time.time(),
            )
            return
        if state.sandbox_args is not None:
            args, kwargs = state.sandbox_args
            if not kwargs and all(type(a) in SCALARS for a in args):
                args = tuple(args)  # the common case: nothing to swap for host objects
            else:
                args, kwargs = self.codec.to_host(state.sandbox_args)
        else:
            args, kwargs = self.codec.decode_host(state.args_text)
        state.status = "pending"
        task = Task(state.call_id, state.attempts + 1, fn, tuple(args), dict(kwargs))
        state.task = task
        self._in_flight += 1
        self._executor.submit(task, self._outcomes.put)

    def _wait(self) -> list[Any]:
        timeout = self.settings.heartbeat
        if self._timers and not self._stopping:
            timeout = max(min(timeout, self._timers[0][0] - time.time()), 0.0)
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

    def _collect(self, items: list[Any]) -> None:
        for outcome in items:
            if outcome is _WAKE:
                continue
            state = self.calls.get(outcome.call_id)
            if state is None or outcome.attempt != state.attempts + 1:
                continue  # an outcome of an attempt this driver no longer waits for
            self._in_flight -= 1
            state.task = None
            state.attempts = outcome.attempt
            state.started_at, state.finished_at = outcome.started_at, outcome.finished_at
            if outcome.ok:
                self._settle_success(state, outcome)
            else:
                self._settle_attempt_failure(state, outcome)

    def _settle_success(self, state: CallState, outcome: Outcome) -> None:
        try:
            text, sandbox_value = self.codec.encode(outcome.value, what=f"the result of {state.function}()")
        except ValueCrossingError as exc:
            self._settle_failure(state, exc, f"ValueCrossingError: {exc}", outcome.finished_at)
            return
        state.status, state.result_text, state.error_text = "done", text, None
        self.answers[state.call_id] = {"return_value": sandbox_value}
        self.counters.done += 1
        state.error_type = state.error_message = state.due_at = None
        self._journal(state)

    def _settle_attempt_failure(self, state: CallState, outcome: Outcome) -> None:
        error = outcome.error
        fn = self._function(state.function)
        policy = policy_for(fn, self.settings.retry)
        if not isinstance(error, Exception) or not policy.should_retry(state.attempts, error):
            self._settle_failure(state, error, outcome.traceback, outcome.finished_at)
            return
        wait = policy.wait_before(state.attempts)
        state.status, state.due_at = "retrying", outcome.finished_at + wait
        state.error_text, state.error_type = outcome.traceback, type(error).__name__
        self._push_timer(state.due_at, state)
        self._journal(state)
        self.run.events.emit(
            CallRetrying(
                self.execution_id, state.call_id, state.function, state.attempts, wait, _last_line(outcome.traceback)
            )
        )

    def _settle_failure(
        self, state: CallState, error: BaseException | None, traceback_text: str, finished_at: float
    ) -> None:
        exc_type = _sandbox_exception_type(error)
        message = _sandbox_message(error)
        state.status, state.error_text, state.error_type = "failed", traceback_text, exc_type
        state.error_message, state.finished_at = message, finished_at
        self.answers[state.call_id] = _error_answer(exc_type, message)
        self._failed_calls[(exc_type, message)] = state
        self.counters.failed += 1
        state.result_text = state.due_at = None
        self._journal(state)
        self.run.events.emit(
            CallFailed(self.execution_id, state.call_id, state.function, state.attempts, _last_line(traceback_text))
        )

    def _journal(self, state: CallState) -> None:
        """Queue the call's current outcome for the next commit (every column, so rows stay signed right)."""
        self.step.call_updates.append(
            {
                "call_id": state.call_id,
                "status": state.status,
                "attempts": state.attempts,
                "result": state.result_text,
                "error": state.error_text,
                "error_type": state.error_type,
                "error_message": state.error_message,
                "due_at": state.due_at,
                "started_at": state.started_at,
                "finished_at": state.finished_at,
            }
        )

    # -- timers (retry backoff and durable sleeps) ------------------------------------------

    def _push_timer(self, due: float, state: CallState) -> None:
        heapq.heappush(self._timers, (due, next(self._timer_seq), state.call_id))

    def _fire_timers(self) -> None:
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
                self._submit(state)

    # -- the end ------------------------------------------------------------------------------

    def _complete(self, snap: MontyComplete) -> None:
        output = snap.output
        exports = self._read_exports()
        result_text = self._encode_final(output, "the result of the workflow")
        outputs_text, outputs = self._encode_exports(exports)
        result_host = self.codec.to_host(output)  # loads (and verifies) stored objects first
        outputs_host = {k: self.codec.to_host(v) for k, v in outputs.items()}
        now = time.time()
        self.step.execution.update(
            status="completed",
            result=result_text,
            outputs=outputs_text,
            result_sig=self.store.sign_execution_result(self.execution_id, result_text, outputs_text),
            finished_at=now,
            error=None,
            error_type=None,
        )
        self._commit_final()
        self._finish_run("completed", result=result_host, outputs=outputs_host, commit=False, finished_at=now)

    def _encode_exports(self, exports: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Stored text of the exported names, leaving out objects of sandbox-defined classes."""
        try:
            return self.codec.encode_text(exports), exports
        except ValueCrossingError:
            pass
        kept = {}
        for name, value in exports.items():
            with contextlib.suppress(ValueCrossingError):  # they cannot leave the sandbox
                self.codec.encode_text(value, what=f"the variable {name!r}")
                kept[name] = value
        return self.codec.encode_text(kept), kept

    def _encode_final(self, value: Any, what: str) -> str | None:
        try:
            return self.codec.encode_text(value, what=what)
        except ValueCrossingError:
            return None

    def _read_exports(self) -> dict[str, Any]:
        names = self.info.exports
        if not names:
            return {}
        lines = ["__dm_exports = {}"]
        for name in names:
            lines += ["try:", f"    __dm_exports[{name!r}] = {name}", "except NameError:", "    pass"]
        lines.append("__dm_exports")
        try:
            exported = self.session.feed_run("\n".join(lines))
        except MontyError:
            return {}
        return exported if isinstance(exported, dict) else {}

    def _fail(self, exc: MontyRuntimeError) -> None:
        text = format_monty_error(exc, self.key)
        inner = exc.exception()
        error_type = type(inner).__name__
        cause = self._failed_calls.get((error_type, _sandbox_message(inner)))
        if cause is not None and cause.error_text:
            text += (
                f"\n\nThe exception came from call {cause.call_id}, {cause.function}({cause.args_repr}), "
                f"after {cause.attempts} attempt(s):\n{cause.error_text}"
            )
        summary = f"{error_type}: {_sandbox_message(inner)}"
        self._record_failure(text, error_type, WorkflowFailed(summary, text, self.execution_id, error_type))

    def _record_failure(self, text: str, error_type: str, error: BaseException) -> None:
        now = time.time()
        self.step.execution.update(status="failed", error=text, error_type=error_type, finished_at=now)
        with contextlib.suppress(Exception):  # the store is unreachable: the handle still reports the failure
            self._commit_final()
        self._finish_run("failed", error=error, commit=False, finished_at=now)

    def _commit_final(self) -> None:
        """The last write of this driver: it also releases the lease."""
        self._announced = []
        self.step.execution["lease_owner"] = None
        self._write_step()

    def _finish_run(
        self,
        status: str,
        *,
        result: Any = None,
        outputs: dict[str, Any] | None = None,
        error: BaseException | None = None,
        commit: bool = True,
        finished_at: float | None = None,
    ) -> None:
        if commit:
            self.step.execution.update(status=status)
            with contextlib.suppress(Exception):
                self._commit_final()
        with self._state_lock:
            self._finished = True
        self.run._finish(
            status, result=result, outputs=outputs, error=error, progress=self.progress(), finished_at=finished_at
        )
        self.run.events.emit(
            ExecutionFinished(self.execution_id, status, None if error is None else str(error).splitlines()[-1])
        )

    # -- prints -----------------------------------------------------------------------------

    def _print(self, stream: str, text: str) -> None:
        self.run.events.emit(Printed(self.execution_id, stream, text))


_PHANTOM = CallState(-1, "", "call", "[]", False)


def is_function_like(value: Any) -> bool:
    """Functions, classes and partials are called as external functions; anything else is data."""
    import functools

    return inspect.isroutine(value) or inspect.isclass(value) or isinstance(value, functools.partial)


def default_printer(stream: str, text: str) -> None:
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.write(text)
    target.flush()


def format_monty_error(exc: MontyError, key: str) -> str:
    """Monty's traceback, with the workflow named and a hint for errors users often meet."""
    try:
        text = exc.display()  # type: ignore[attr-defined]
    except Exception:
        text = str(exc)
    text = text.replace('File "<python-input-1>"', f'File "<workflow {key}>"')
    try:
        inner = exc.exception()
    except Exception:
        inner = None
    if isinstance(inner, ModuleNotFoundError):
        text += (
            "\nWorkflow code runs in the Monty sandbox, which offers only part of the standard library "
            "(asyncio, math, json, re, datetime, ...). Import other modules inside a notebook function "
            "and call that function from the workflow."
        )
    return text


def _sandbox_exception_type(error: BaseException | None) -> str:
    if error is None:
        return "Exception"
    for cls in type(error).__mro__:
        if cls.__module__ == "builtins" and cls.__name__ in _SANDBOX_EXCEPTIONS:
            return cls.__name__
    return "Exception"


def _sandbox_message(error: BaseException | None) -> str:
    if error is None:
        return ""
    message = str(error.args[0]) if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    if type(error).__module__ != "builtins":
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return message


def _error_answer(exc_type: str | None, message: str | None) -> dict[str, Any]:
    return {"exc_type": exc_type if exc_type in _SANDBOX_EXCEPTIONS else "Exception", "message": message or ""}


def _last_line(text: str | None) -> str:
    """The message of the last line of a traceback (``ValueError: bad`` -> ``bad``)."""
    last = last_line(text)
    head, sep, tail = last.partition(": ")
    return tail if sep and " " not in head.strip() else last
