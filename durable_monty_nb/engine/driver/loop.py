"""The driver: one thread that owns a Monty session and drives one execution to its end.

Each turn of the loop:

1. **advance** Monty until it blocks (:mod:`.protocol`);
2. **commit** one transaction (:mod:`.ledger`): the results received, the new call rows, the
   attempts about to be dispatched and, when calls were announced, the snapshot that names
   them (checkpoint before dispatch);
3. **dispatch** the new calls to the executor, then **wait** for outcomes, timers or a stop
   (:mod:`.scheduling`).

Nothing is dispatched before the checkpoint naming it is committed, and a result reaches the
store in the same transaction as any state that depends on it, so a restart from the latest
checkpoint re-runs only the calls that had no committed result (and, with a durable executor,
not even those whose attempt is still alive on a worker).
"""

from __future__ import annotations

import contextvars
import itertools
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic_monty import MontyComplete, MontyCrashedError, MontyRuntimeError, MontySession

from ... import defaults
from ...errors import DurableError, LeaseLost, StoreUnavailable, WorkflowFailed, interrupted_error
from ...executors.base import Executor, LocalCall, Outcome
from ...signals import Wait
from ...store import mailbox
from ...store.owners import release_owner
from ...store.store import Step, Store
from ...store.transient import Outage
from ...values import ValueCodec
from .. import sandbox
from ..analysis import CodeInfo
from ..controls import NO_LIMITS, CallControls
from ..events import Printed
from ..fingerprint import Fingerprinter
from ..retry import RetryPolicy
from ..run import CallView, FunctionStats, Progress, Run, function_stats
from . import collecting, switching
from .book import CallBook
from .calls import DONE, FAILED, CallState
from .clock import SYSTEM_CLOCK, Clock
from .components import Hooks
from .finishing import Finishing
from .gathers import Gathers
from .ledger import Ledger
from .limiting import call_controls
from .protocol import MontyProtocol
from .retries import Retries
from .scheduling import WAKE, Scheduling
from .waits import wait_components


@dataclass
class Settings:
    """How the driver runs calls."""

    workers: int = defaults.WORKERS
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lease_ttl: float = defaults.LEASE_TTL
    store_outage_limit: float = defaults.STORE_OUTAGE_LIMIT  # then stop as interrupted
    controls: CallControls = NO_LIMITS  # for functions without limits of their own
    clock: Clock = SYSTEM_CLOCK  # what timers, deadlines and heartbeats read (a ManualClock in tests)

    @property
    def heartbeat(self) -> float:
        return self.lease_ttl / 3


class Driver(MontyProtocol, Gathers, Ledger, Scheduling, Finishing):
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
        executor: Executor,
        session: MontySession,
        snapshot: Any,
        shipped: dict[str, tuple[str, str, bytes]] | None = None,
        restored_calls: list[Any] | None = None,
        retry_failed: bool = False,
        reuse_key: str | None = None,
        on_exit: Callable[[Driver], None] | None = None,
        fingerprinter: Fingerprinter | None = None,
        rerun_functions: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.codec = codec
        self.info = info
        self.run = run
        run._source = self
        self.execution_id = run.execution_id
        self.key = run.key
        self.owner = owner
        self.namespace = namespace
        self.inputs = inputs
        self.settings = settings
        self.executor = executor
        self.session = session
        self._snapshot = snapshot
        self.reuse_key = reuse_key
        self._on_exit = on_exit
        self.fingerprinter = fingerprinter or Fingerprinter()
        self.rerun_functions = rerun_functions

        self.clock: Clock = settings.clock  # what the loop and its components read the time from
        self.book = CallBook()  # the calls, their answers, counters and journal (the only writer of a status)
        self.calls: dict[int, CallState] = self.book.calls  # read-only views of the book's own
        self.answers: dict[int, dict[str, Any]] = self.book.answers
        self.counters = self.book.counters
        self.step = Step(execution={"status": "running", "finished_at": None})
        self._announced: list[CallState] = []
        self._new_rows: dict[int, dict[str, Any]] = {}
        self._to_reuse: list[CallState] = []
        self._to_dispatch: list[CallState] = []
        self._to_attach: list[CallState] = []
        self._timers: list[tuple[float, int, int]] = []
        self._timer_seq = itertools.count()
        self._outcomes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_flight = 0
        self._functions: dict[str, tuple[str, bool]] = {}
        self._frame_indexes: dict[str, Any] = {}  # by function: where its shipped code came from
        self._callables: dict[str, Callable[..., Any]] = {}
        self._argument_classes: dict[str, str] = {}  # type name -> class token ("" for other types)
        self._shipped: dict[str, str] = {}
        self._args_blobs: dict[int, str] = {}
        self._stopping = False
        self._finished = False
        self._state_lock = threading.Lock()
        self._last_commit = 0.0
        self._crashes = 0
        self._thread: threading.Thread | None = None
        self._cpu_release: Callable[[], None] | None = None
        self._go = threading.Event()
        self._switching = False  # counted among the running drivers of switching.py
        for name, (key, fingerprint, data) in (shipped or {}).items():
            self._shipped[name] = key
            self.step.functions[key] = (name, fingerprint, data)
        # Call sites not reached yet, for the expected total (unknown after a restore: the
        # sites the checkpoint passed are not known).
        self._sites_left = set(info.single_sites) if restored_calls is None else set()
        self._init_gathers()
        self.parked = False  # blocked on waits from outside only (views and magics stop blocking the cell)
        self.waiting = wait_components(self, store, self.execution_id, self.key, settings.heartbeat, self._unpark)
        w = self.waiting
        self.hooks = Hooks(  # the components, in the order the loop calls them (components.py)
            [
                w.sleeps,
                *call_controls(self, settings.controls),
                Retries(self, settings.retry),
                w.signals,
                w.externals,
                w.mailbox,
            ]
        )
        self._journaled: set[str] = set()  # attempt ids already in a step
        # A run again after a failure: the attempts the failed run left going (call id -> attempt
        # number). They run in the environment before the fix: one that fails gets a fresh try.
        self._before_fix: dict[int, int] = {}
        self._outage = Outage(self.clock.now)
        if restored_calls is not None:
            self._restore_calls(restored_calls, retry_failed)

    # -- the RunSource protocol (called from other threads) ------------------------------------

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
            hold = getattr(self.executor, "hold", None)
            if hold is not None:  # no queued call starts from now on, before this loop withdraws them
                hold()
        self._go.set()
        self._outcomes.put(WAKE)

    def reactivate(self) -> bool:
        """Undo a stop request; False when the driver already finished."""
        with self._state_lock:
            if self._finished:
                return False
            self._stopping = False
            release = getattr(self.executor, "release", None)
            if release is not None:
                release()
        self._outcomes.put(WAKE)
        return True

    def progress(self) -> Progress:
        c = self.book.snapshot()  # one consistent copy of the counters, whatever the driver does meanwhile
        queued, running = self.executor.counts()
        in_flight = max(self._in_flight, 0)
        running = min(running, in_flight)
        expected = None
        if self._finished:
            expected = c.total
        elif not self.info.open_total:
            expected = c.total + len(self._sites_left)
        return Progress(
            total=c.total,
            expected=expected,
            done=c.done,
            failed=c.failed,
            running=running,
            queued=min(queued, in_flight - running),
            retrying=c.retrying,
            waiting=c.waiting,
            restored=c.restored,
            reused=c.reused,
            note=None if self._finished else (self._store_problem() or self.executor.problem),
            signals=self.waiting.signals.count(),
            external=self.waiting.externals.count(),
            limited=sum(waiting() for waiting in self.hooks.waiting),
        )

    def waits(self) -> list[Wait]:
        """What the execution waits for from outside, in call order."""
        return self.waiting.waits()

    def deliver(
        self, signal: str, value: Any = None, *, idempotency_key: str | None = None, source: str = "widget"
    ) -> mailbox.Delivery:
        """Deliver a signal to this execution (the widget's buttons use it)."""
        from ...signals import deliver_signal

        row = self.store.get_execution(self.execution_id)
        return deliver_signal(
            self.store, self.execution_id, signal, value, idempotency_key=idempotency_key, source=source, execution=row
        )

    def _unpark(self) -> None:
        """A delivery came (any thread): active again until the driver has looked."""
        self.parked = False

    def call_views(self) -> list[CallView]:
        return [state.view() for state in list(self.calls.values())]

    def live_calls(self, limit: int) -> dict[str, list[int]]:
        """The ids of unfinished calls that are running, queued, limited, waiting or retrying (at
        most ``limit`` each): one pass over the unfinished calls only, no argument formatting."""
        live: dict[str, list[int]] = {}
        for state in self.book.unfinished_states():
            if state.status is DONE or state.status is FAILED:
                continue
            status = state.view_status
            if status != "pending":
                ids = live.setdefault(status, [])
                if len(ids) < limit:
                    ids.append(state.call_id)
        return live

    def function_stats(self) -> list[FunctionStats]:
        """Per-function counts and durations, for live views: one pass, no argument formatting."""
        return function_stats(
            (s.function, s.view_status, s.started_at, s.finished_at) for s in list(self.calls.values())
        )

    # -- what components may ask of the loop (components.Loop) -----------------------------------

    def function(self, name: str) -> Callable[..., Any] | None:
        return self._function(name)

    def wake(self) -> None:
        self._outcomes.put(WAKE)

    def push_timer(self, due: float, state: CallState) -> None:
        self._push_timer(due, state)

    def settle(self, outcome: Outcome) -> None:
        self._collect([outcome])

    def report(self, outcome: Outcome) -> None:
        self._outcomes.put(outcome)

    def register(self, state: CallState, call_key: str, due_at: float | None = None) -> None:
        self._register(state, call_key=call_key, due_at=due_at)

    def local_call(self, state: CallState) -> LocalCall | None:
        return self._local_call(state)

    def consume(self, seq: int, call_id: int) -> None:
        self.step.consumed_signals.append((seq, call_id))

    def emit_retrying(self, state: CallState, wait: float, message: str) -> None:
        self._emit_retrying(state, wait, message)

    # -- the loop ------------------------------------------------------------------------

    def _main(self) -> None:
        self._share_cpu()
        self._begin_switching()
        try:
            self._go.wait()
            self._attach_pending()
            self._loop(self._snapshot)
        except LeaseLost as exc:
            self._finish_run("interrupted", error=exc, commit=False)
        except StoreUnavailable as exc:
            self._finish_run("interrupted", error=self._outage_error(exc), commit=False)
        except DurableError as exc:  # e.g. a tampered row: stop, keep the execution resumable
            self._finish_run("interrupted", error=exc)
        except Exception as exc:  # an engine bug must not leave the handle waiting forever
            text = "".join(traceback.format_exception(exc))
            self._record_failure(
                f"internal error in durable-monty-nb:\n{text}",
                type(exc).__name__,
                WorkflowFailed(f"internal error: {exc}", text, self.execution_id, type(exc).__name__),
            )
        finally:
            for close in self.hooks.close:
                close()
            release_owner(self.owner)
            self.store.release_writer()
            self._unshare_cpu()
            sandbox.close_session(self.session)
            self.executor.shutdown()
            self._release_memory()
            self._end_switching()
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
            try:
                with collecting.paused():  # (collecting.py) at most the store's retry window
                    self._commit(snap)
            except StoreUnavailable as exc:
                self._ride_out(exc)  # keep results in memory, dispatch nothing, try again
                continue
            self._outage.recovered()
            if self._stopping:
                self._withdraw_queued()  # no new call starts (scheduling.py)
            with self._state_lock:
                # Attempts on a durable executor go on without us and report to the store, and
                # so do external calls (their completions are taken when the run resumes).
                in_flight = self._in_flight - self.waiting.externals.count()
                if self._stopping and (in_flight <= 0 or self.executor.durable):
                    self._finished = True
            if self._finished:
                self._finish_run("interrupted", error=interrupted_error(self.execution_id, self.key))
                return
            if not self._stopping:
                with collecting.paused():
                    self._dispatch()
            self._note_parked()
            items = self._wait()
            with collecting.paused():
                self._collect(items)
            if not self._stopping:
                now = self.clock.now()
                for before_timers in self.hooks.before_timers:  # the mailbox (waits.py)
                    before_timers(now)
                self._fire_timers()

    def _note_parked(self) -> None:
        """Before blocking: is the run parked, waiting for nothing but signals and external completions?"""
        outside = self.waiting.outside()
        if outside and self.waiting.mailbox.check:
            self._outcomes.put(WAKE)  # a delivery may be waiting already: look before blocking
            self.parked = False
            return
        c = self.counters  # no retry or sleep to come (each has its timer)
        self.parked = bool(
            outside
            and not self._to_dispatch
            and self._in_flight <= self.waiting.externals.count()
            and not c.retrying
            and not c.waiting
        )
        if self.parked:  # hours, maybe: leave the interpreter's thread switching alone meanwhile
            self._end_switching()
        else:
            self._begin_switching()

    def _begin_switching(self) -> None:
        """Counted among the running drivers of switching.py (at the start, and when unparked)."""
        if not self._switching:
            self._switching = True
            switching.driver_running()

    def _end_switching(self) -> None:
        """No longer counted (once; before the run's handle resolves, and when parked)."""
        if self._switching:
            self._switching = False
            switching.driver_stopped()

    def _ride_out(self, exc: StoreUnavailable, *, collect: bool = True) -> None:
        """The store is unreachable: wait for outcomes (kept in memory) and commit again soon;
        past ``store_outage_limit`` stop as interrupted, losing nothing committed."""
        self._outage.failed(exc.__cause__ or exc)
        now = self.clock.now()
        if now - (self._outage.since or now) > self.settings.store_outage_limit:
            raise exc
        items = self._wait(timeout=min(self.settings.heartbeat, 1.0))
        if collect:
            self._collect(items)
            if not self._stopping:
                self._fire_timers()

    def _outage_error(self, exc: StoreUnavailable) -> StoreUnavailable:
        """The error a run stopped by an unreachable store ends with: the store, the cause, what to do."""
        self._outage.failed(exc.__cause__ or exc)
        now = self.clock.now()
        down_for = now - (self._outage.since or now)
        error = StoreUnavailable(
            f"{exc}. Unreachable since {self._outage.since_text} ({down_for:.0f} s): the execution stopped "
            f"as interrupted, and every result committed before is kept. Resume it when the store is back "
            f"(%durable_resume {self.key})."
        )
        error.__cause__ = exc.__cause__
        return error

    def _store_problem(self) -> str | None:
        if self._outage.since is None:
            return None
        return f"store unreachable since {self._outage.since_text}, retrying ({self._outage.cause})"

    def _share_cpu(self) -> None:
        """With an executor whose threads may start from this one (they unpin themselves), run
        on one CPU with the session's worker (see :mod:`durable_monty_nb.cpus`)."""
        self._unshare_cpu()
        self._cpu_release = sandbox.share_cpu(self.session, share=getattr(self.executor, "pin_safe", False))

    def _unshare_cpu(self) -> None:
        release, self._cpu_release = self._cpu_release, None
        if release is not None:
            release()

    def _release_memory(self) -> None:
        """After the end only the call list stays (for views); drop values and sandbox state."""
        self.answers.clear()
        self._gathers.clear()
        self._member_of.clear()
        self._gather_answers.clear()
        self.inputs.clear()
        self.codec.objects.clear()
        self.fingerprinter = Fingerprinter()  # what it hashed by id, kept alive for the run only
        for state in self.calls.values():
            state.sandbox_args = None
            state.task = None

    def _print(self, stream: str, text: str) -> None:
        self.run.events.emit(Printed(self.execution_id, stream, text))


def default_printer(stream: str, text: str) -> None:
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.write(text)
    target.flush()
