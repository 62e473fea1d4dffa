"""The waits as components of the driver, alone, on a settable clock: durable sleeps, signals,
external calls and the mailbox they read.

A small loop stands in for the driver (its turn order: the mailbox before the due timers, as
``engine/driver/loop.py`` runs it); the mailbox is a real one, in a SQLite store. The same
behaviour through Monty, the engine and real time: ``tests/test_signals.py``,
``tests/test_server.py`` (external calls), ``tests/test_engine.py`` (sleeps).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loops import StandInLoop

from durable_monty_nb.engine.driver.book import DONE, FAILED, PENDING
from durable_monty_nb.engine.driver.calls import CallState
from durable_monty_nb.engine.driver.components import Hooks
from durable_monty_nb.engine.driver.waits import EXTERNAL_WORKER, signal_arguments, wait_components
from durable_monty_nb.executors.base import ErrorInfo, LocalCall, Outcome
from durable_monty_nb.signals import ExternalCall, completion_payload, encode_value, external
from durable_monty_nb.store import mailbox
from durable_monty_nb.store.mailbox import SignalError, call_signal_name
from durable_monty_nb.store.store import Store
from durable_monty_nb.tokens import verify_token
from durable_monty_nb.values import ValueCodec

EXECUTION = "e-waits"
HEARTBEAT = 10.0
LOOPS: list[WaitLoop] = []


class WaitLoop(StandInLoop):
    """The driver's side of ``components.Loop`` over a :class:`ManualClock` and a real store."""

    name, remote, durable = "threads", False, False  # the executor too (external calls never reach it)

    def __init__(self, store: Store, functions: dict[str, Any] | None = None) -> None:
        super().__init__(functions or {}, 1_000.0)
        self.codec = ValueCodec()
        self.executor = self
        self.rows: dict[int, tuple[str, float | None]] = {}  # registered: call key, due
        self.consumed: list[tuple[int, int]] = []
        self.reported: list[Outcome] = []
        self.reported_event = threading.Event()
        self.failures: list[tuple[int, str]] = []
        self.errors: list[ErrorInfo] = []
        self.waits = wait_components(self, store, EXECUTION, "key", HEARTBEAT, lambda: None)  # type: ignore[arg-type]
        w = self.waits
        self.hooks = Hooks([w.sleeps, w.signals, w.externals, w.mailbox])
        LOOPS.append(self)

    # components.Loop (with StandInLoop's)
    def settle(self, outcome: Outcome) -> None:
        """As the driver's outcome handling: the attempt ends, then the call is done or failed."""
        state = self.book.calls[outcome.call_id]
        state.task = None
        for ended in self.hooks.ended:
            ended(state)
        state.attempts, state.worker = outcome.attempt, outcome.worker or None
        if outcome.ok:
            self.book.transition_pending_done(state, "x", {"return_value": outcome.value})
        else:
            assert outcome.error is not None
            self.failures.append((state.call_id, outcome.error.message))
            self.errors.append(outcome.error)

    def report(self, outcome: Outcome) -> None:
        self.reported.append(outcome)
        self.reported_event.set()

    def register(self, state: CallState, call_key: str, due_at: float | None = None) -> None:
        self.book.add(state)
        self.rows[state.call_id] = (call_key, due_at)

    def local_call(self, state: CallState) -> LocalCall | None:
        return LocalCall(self.functions[state.function], (state.call_id,), {})

    def consume(self, seq: int, call_id: int) -> None:
        self.consumed.append((seq, call_id))

    # the loop's side
    def at(self, seconds: float) -> None:
        """Move the clock to ``seconds`` after the start and take a turn: mailbox, then timers."""
        self.clock.set(1_000.0 + seconds)
        now = self.clock.now()
        for before_timers in self.hooks.before_timers:
            before_timers(now)
        while self.timers and self.timers[0][0] <= now:
            _, _, call_id = heapq.heappop(self.timers)
            state = self.book.calls[call_id]
            any(timer(state, now) for timer in self.hooks.timer)

    def dispatch(self, state: CallState) -> bool:
        now = self.clock.now()
        return any(dispatch(state, now) for dispatch in self.hooks.dispatch)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    yield Store(f"sqlite:///{tmp_path / 'waits.db'}", secret="waits")
    while LOOPS:  # stop listening for deliveries (process-wide, by execution id)
        LOOPS.pop().waits.mailbox.close()


def deliver(store: Store, name: str, value: Any) -> int:
    return mailbox.deliver(store, EXECUTION, name, encode_value(value)).seq


def test_each_kind_of_wait_implements_only_its_hooks(store: Store) -> None:
    loop = WaitLoop(store)
    owners = {name: [type(h.__self__).__name__ for h in getattr(loop.hooks, name)] for name in ("restore", "dispatch")}
    assert owners == {"restore": ["Sleeps", "Signals"], "dispatch": ["Externals"]}
    assert [type(h.__self__).__name__ for h in loop.hooks.timer] == ["Sleeps", "Signals", "Externals"]
    assert [type(h.__self__).__name__ for h in loop.hooks.ended] == ["Externals"]  # the hot path: one
    assert [type(h.__self__).__name__ for h in loop.hooks.before_timers] == ["Mailbox"]
    assert loop.hooks.waiting == []  # a wait is not a limited call


def test_a_durable_sleep_is_done_when_the_clock_reaches_it_and_a_restored_one_keeps_its_time(store: Store) -> None:
    loop = WaitLoop(store)
    state = loop.waits.sleeps.announce(0, "asyncio.sleep", (3600,), True)
    loop.push_timer(4_600.0, state)  # a second timer of it (announced again after a sandbox crash)
    assert loop.rows[0][1] == state.due_at == 4_600.0 and loop.book.snapshot().waiting == 1
    loop.at(3599.9)
    assert state.status is PENDING
    loop.at(3600.0)
    assert state.status is DONE and state.finished_at == 4_600.0 and loop.book.answers[0] == {"return_value": None}
    assert loop.book.snapshot().waiting == 0

    again = WaitLoop(store)  # a restart: the row's due time stands, whenever the driver comes back
    restored = CallState(0, "asyncio.sleep", "sleep", "[[3600], {}]", True, "sleep", due_at=4_600.0, restored=True)
    again.book.restore(restored, retry_failed=False)
    assert any(restore(restored, again.clock.now()) for restore in again.hooks.restore)
    again.at(3599.0)
    assert restored.status is PENDING
    again.at(3600.0)
    assert restored.status is DONE


def test_signals_go_oldest_first_to_the_earliest_wait_and_are_consumed_once(store: Store) -> None:
    loop = WaitLoop(store)
    signals = loop.waits.signals
    first_seq = deliver(store, "go", "first")  # delivered before anything waits: kept
    first = signals.wait(0, "go", None, True)
    second = signals.wait(1, "go", None, True)
    assert [w.name for w in loop.waits.waits()] == ["go", "go"] and loop.waits.outside() == 2
    loop.at(0.0)
    assert first.status is DONE and loop.book.answers[0] == {"return_value": "first"}
    assert second.status is PENDING and loop.consumed == [(first_seq, 0)]
    wakes = loop.wakes
    second_seq = deliver(store, "go", "second")  # this process's delivery wakes the driver
    assert loop.wakes == wakes + 1
    loop.at(0.1)
    assert second.status is DONE and loop.book.answers[1] == {"return_value": "second"}
    assert loop.consumed == [(first_seq, 0), (second_seq, 1)] and loop.waits.waits() == []
    loop.at(0.2)  # the deliveries are not consumed in the store until a commit: never handed out twice
    assert loop.consumed == [(first_seq, 0), (second_seq, 1)]


def test_the_mailbox_is_read_for_other_processes_deliveries_at_the_heartbeat(store: Store) -> None:
    loop = WaitLoop(store)
    loop.waits.mailbox.close()  # deliveries below come as from another process: no wake-up
    state = loop.waits.signals.wait(0, "later", None, True)
    loop.at(0.0)  # looked once (the wait was announced): nothing yet
    deliver(store, "later", 7)
    loop.at(HEARTBEAT - 0.1)
    assert state.status is PENDING and loop.wakes == 0
    loop.at(HEARTBEAT)
    assert state.status is DONE and loop.book.answers[0] == {"return_value": 7}


def test_a_signal_timeout_fails_the_wait_at_its_deadline_unless_the_signal_came_first(store: Store) -> None:
    loop = WaitLoop(store)
    loop.waits.mailbox.close()
    late = loop.waits.signals.wait(0, "approval", 30, True)
    won = loop.waits.signals.wait(1, "answer", 30, True)
    assert late.due_at == won.due_at == 1_030.0 and loop.rows[0][1] == 1_030.0
    loop.at(25.0)  # read at the heartbeat: nothing yet (the next one would be at 35)
    deliver(store, "answer", "yes")  # from another process, before the deadline: read at the deadline
    loop.at(29.9)
    assert late.status is PENDING and won.status is PENDING
    loop.at(30.0)
    assert won.status is DONE and loop.book.answers[1] == {"return_value": "yes"}
    assert late.status is FAILED and late.error_message == "no signal 'approval' arrived within 30 s"
    assert loop.book.answers[0] == {"exc_type": "TimeoutError", "message": "no signal 'approval' arrived within 30 s"}


def test_a_timed_out_signal_wait_tried_again_gets_a_fresh_deadline(store: Store) -> None:
    loop = WaitLoop(store)
    state = CallState(0, "signal", "signal", '[["go"], {"timeout": 5.0}]', True, "signal", restored=True)
    loop.book.restore(state, retry_failed=False)
    assert loop.waits.signals.restore(state, loop.clock.now()) and state.due_at == 1_005.0
    loop.at(5.0)
    assert state.status is FAILED


def test_signal_arguments_are_a_name_and_a_timeout() -> None:
    assert signal_arguments(("go",), {}) == ("go", None)
    assert signal_arguments((), {"name": "go", "timeout": 2}) == ("go", 2.0)
    for args, kwargs in [((), {}), (("go", -1), {}), (("go",), {"other": 1}), (("go", True), {})]:
        with pytest.raises(TypeError):
            signal_arguments(args, kwargs)
    with pytest.raises(SignalError):
        signal_arguments(("no spaces",), {})


def external_loop(store: Store, hook: Any = None, timeout: float | None = None) -> tuple[WaitLoop, CallState]:
    @external(hook=hook, timeout=timeout)
    def review(n: int) -> None: ...

    loop = WaitLoop(store, {"review": review})
    state = CallState(4, "review", "call", "[[4],{}]", True)
    loop.book.add(state)
    return loop, state


def test_an_external_call_is_published_with_a_token_and_completed_from_the_mailbox(store: Store) -> None:
    published: list[ExternalCall] = []
    ran = threading.Event()

    def publish(call: ExternalCall) -> None:
        published.append(call)
        ran.set()

    loop, state = external_loop(store, hook=publish)
    assert loop.dispatch(state) and state.task is not None and state.worker == EXTERNAL_WORKER
    assert ran.wait(10)  # the hook runs in a thread of its own
    (call,) = published
    assert (call.call_id, call.attempt, call.args) == (4, 1, (4,)) and call.url.endswith(
        f"/calls/{call.token}/complete"
    )
    scope = verify_token(store.signer, call.token)
    assert (scope.execution_id, scope.call_id, scope.attempt) == (EXECUTION, 4, 1)
    assert [(w.kind, w.name, w.attempt) for w in loop.waits.waits()] == [("external", "review", 1)]
    deliver(store, call_signal_name(4, 2), completion_payload("not this attempt's", None))
    seq = deliver(store, call_signal_name(4, 1), completion_payload({"ok": True}, None))
    loop.at(1.0)
    assert state.status is DONE and loop.book.answers[4] == {"return_value": {"ok": True}}
    assert state.worker == EXTERNAL_WORKER and loop.consumed == [(seq, 4)] and loop.waits.outside() == 0


def test_an_external_error_keeps_a_builtin_class_and_a_deadline_fails_the_attempt(store: Store) -> None:
    loop, state = external_loop(store, timeout=60)
    loop.dispatch(state)
    deliver(store, call_signal_name(4, 1), completion_payload(None, {"type": "ValueError", "message": "bad"}))
    loop.at(0.0)
    assert loop.failures == [(4, "bad")] and loop.waits.externals.count() == 0
    assert "builtins.ValueError" in loop.errors[0].types  # catchable as ValueError in the workflow
    assert loop.timers  # its deadline's timer stays, for an attempt that ended: ignored
    loop.at(60.0)
    assert loop.failures == [(4, "bad")]

    loop, state = external_loop(store, timeout=60)
    state.attempts = 1  # its second attempt: the first one's completion above is not its
    loop.dispatch(state)
    loop.at(59.9)
    assert loop.failures == []
    loop.at(60.0)
    assert loop.failures == [(4, "review() was not completed within its timeout")]


def test_a_failing_hook_reports_the_attempt_failed_and_a_completed_restored_one_is_not_run_again(store: Store) -> None:
    def broken(call: ExternalCall) -> None:
        raise ConnectionError("the queue is down")

    loop, state = external_loop(store, hook=broken)
    loop.dispatch(state)
    assert loop.reported_event.wait(10)
    (outcome,) = loop.reported
    assert not outcome.ok and outcome.error is not None and outcome.error.message == "the queue is down"
    assert outcome.finished_at == loop.clock.now()

    release = threading.Event()

    def held(call: ExternalCall) -> None:
        release.wait(10)  # alive until released: had it been started, its thread would be seen

    loop, state = external_loop(store, hook=held)
    state.restored = True
    deliver(store, call_signal_name(4, 1), completion_payload(1, None))  # came while the kernel was down
    loop.dispatch(state)
    hooks = [t for t in threading.enumerate() if t.name == "durable-hook-4"]
    release.set()
    assert hooks == []
    loop.at(0.0)
    assert state.status is DONE and loop.book.answers[4] == {"return_value": 1}
