"""Components of the driver: parts with their own state that the loop calls at fixed points.

The loop keeps the Monty protocol and the turn order; a component (a call control, a kind of
wait) owns its state and reaches the loop only through :class:`Loop`, a narrow interface. Each
hook has a default that does nothing, so a component implements only the points it needs:

- ``restore(state, now)``: a call of the checkpoint without an outcome; True when the component
  waits for it (a sleep, a signal), so the loop does not dispatch it;
- ``admit(states, now)``: before dispatch, the calls that may start now (the others wait in it);
- ``dispatch(state, now)``: True when the component dispatched the admitted call itself (an
  external call; counted in flight when it got a task);
- ``started(state, now)``: an attempt was handed to the executor;
- ``ended(state)``: an attempt ended (any outcome, also a timeout);
- ``failed(state, outcome)``: an attempt failed; True when the component handled it (not a failure);
- ``timer(state, now)``: a timer of the call fired; True when it was the component's;
- ``before_timers(now)``: each turn, before the due timers fire (not while stopping);
- ``after_timers()``: after the turn's timers fired;
- ``next_check()``: when the component wants the loop awake (None: no wish);
- ``waiting()``: calls held by the component (shown as ``limited``; read by other threads);
- ``close()``: the run ended.

Adding a call control is one component here, one field in the options, and its line in the
component list of :class:`~.loop.Driver`. The call controls are in :mod:`.limiting`, retries in
:mod:`.retries`, the waits (sleeps, signals, external calls, the mailbox) in :mod:`.waits`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ...executors.base import Executor, LocalCall, Outcome
    from ...values import ValueCodec
    from .book import CallBook
    from .calls import CallState
    from .clock import Clock


class Loop(Protocol):
    """What a component may ask of the driver's loop."""

    book: CallBook
    executor: Executor
    clock: Clock  # the time, for a component whose hook is not given it
    codec: ValueCodec  # values of the run (stored text <-> sandbox and host values)

    def function(self, name: str) -> Callable[..., Any] | None:
        """The live notebook function of that name (None when the namespace has none)."""
        ...

    def wake(self) -> None:
        """Have the loop look again now (from any thread)."""
        ...

    def push_timer(self, due: float, state: CallState) -> None:
        """Call ``timer(state, now)`` of the components at ``due``."""
        ...

    def settle(self, outcome: Outcome) -> None:
        """End an attempt with ``outcome``, as if its executor had reported it."""
        ...

    def report(self, outcome: Outcome) -> None:
        """``settle`` from any thread: the outcome is taken at the loop's next turn."""
        ...

    def register(self, state: CallState, call_key: str, due_at: float | None = None) -> None:
        """A new call announced by the workflow: in the book and in the next checkpoint's rows."""
        ...

    def local_call(self, state: CallState) -> LocalCall | None:
        """The call's live function and arguments (None: it failed, the function is unknown)."""
        ...

    def consume(self, seq: int, call_id: int) -> None:
        """Mark the mailbox's delivery ``seq`` consumed by the call, in the next commit."""
        ...

    def emit_retrying(self, state: CallState, wait: float, message: str) -> None: ...


class Component:
    """A part of the driver (see the module docstring); every hook defaults to nothing."""

    def restore(self, state: CallState, now: float) -> bool:
        return False

    def admit(self, states: list[CallState], now: float) -> list[CallState]:
        return states

    def dispatch(self, state: CallState, now: float) -> bool:
        return False

    def started(self, state: CallState, now: float) -> None:
        return None

    def ended(self, state: CallState) -> None:
        return None

    def failed(self, state: CallState, outcome: Outcome) -> bool:
        return False

    def timer(self, state: CallState, now: float) -> bool:
        return False

    def before_timers(self, now: float) -> None:
        return None

    def after_timers(self) -> None:
        return None

    def next_check(self) -> float | None:
        return None

    def waiting(self) -> int:
        return 0

    def close(self) -> None:
        return None


HOOKS = (
    "restore",
    "admit",
    "dispatch",
    "started",
    "ended",
    "failed",
    "timer",
    "before_timers",
    "after_timers",
    "next_check",
    "waiting",
    "close",
)


class Hooks:
    """The components' hooks by name, each list holding only the components that implement it,
    so the loop's hot path (``started``, ``ended``: once per attempt) calls no empty ones."""

    def __init__(self, components: list[Component]) -> None:
        self.components = components
        for name in HOOKS:
            default = getattr(Component, name)
            setattr(self, name, [getattr(c, name) for c in components if getattr(type(c), name) is not default])

    restore: list[Callable[[CallState, float], bool]]
    admit: list[Callable[[list[CallState], float], list[CallState]]]
    dispatch: list[Callable[[CallState, float], bool]]
    started: list[Callable[[CallState, float], None]]
    ended: list[Callable[[CallState], None]]
    failed: list[Callable[[CallState, Outcome], bool]]
    timer: list[Callable[[CallState, float], bool]]
    before_timers: list[Callable[[float], None]]
    after_timers: list[Callable[[], None]]
    next_check: list[Callable[[], float | None]]
    waiting: list[Callable[[], int]]
    close: list[Callable[[], None]]
