"""The handle of a running (or finished) execution: progress, wait, result, cancel.

A :class:`Run` reads what it shows from a :class:`RunSource`: the driver while this process
drives the execution, the store's rows once it finished (or when it came from the store).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .events import Event, EventBus


@dataclass(frozen=True)
class Progress:
    """Counts of the calls of an execution at one moment.

    ``done`` includes ``restored`` (results loaded from the store on resume) and ``reused``
    (served from an earlier execution of the same key); ``waiting`` counts durable timers.
    """

    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    queued: int = 0
    retrying: int = 0
    waiting: int = 0
    restored: int = 0
    reused: int = 0
    note: str | None = None  # what keeps calls from progressing (no worker listening, Redis unreachable)

    def details(self) -> list[tuple[str, int]]:
        """(label, count) of every category besides ``done``, in display order."""
        return [
            ("running", self.running),
            ("queued", self.queued),
            ("retrying", self.retrying),
            ("failed", self.failed),
            ("waiting", self.waiting),
            ("restored", self.restored),
            ("reused", self.reused),
        ]

    @property
    def fraction(self) -> float:
        return (self.done + self.failed) / self.total if self.total else 0.0


@dataclass(frozen=True)
class CallView:
    """One call, as views show it."""

    call_id: int
    function: str
    args: str
    status: str
    attempts: int
    duration: float | None
    error: str | None
    worker: str = ""


class RunSource(Protocol):
    """What a run's live state comes from (the driver of this process implements it)."""

    def progress(self) -> Progress: ...

    def call_views(self) -> list[CallView]: ...

    def begin(self) -> None: ...

    def request_stop(self) -> None: ...


class Run:
    """A handle on one execution.

    ``status`` is ``running``, ``completed``, ``failed`` or ``interrupted``. ``cached`` is True
    when the result came straight from the store (nothing ran).
    """

    def __init__(self, execution_id: str, key: str, *, source: RunSource | None = None) -> None:
        self.execution_id = execution_id
        self.key = key
        self.events = EventBus()
        self._source = source
        self._done = threading.Event()
        self.status = "running"
        self.cached = False
        self._result: Any = None
        self._outputs: dict[str, Any] = {}
        self._error: BaseException | None = None
        self._final_progress: Progress | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None

    # -- set by the engine / driver --------------------------------------------------------

    def _finish(
        self,
        status: str,
        *,
        result: Any = None,
        outputs: dict[str, Any] | None = None,
        error: BaseException | None = None,
        progress: Progress | None = None,
        finished_at: float | None = None,
    ) -> None:
        self.status = status
        self._result = result
        self._outputs = outputs or {}
        self._error = error
        self._final_progress = progress
        self.finished_at = finished_at
        self._done.set()

    # -- public API ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def progress(self) -> Progress:
        if self._source is not None and not self._done.is_set():
            return self._source.progress()
        return self._final_progress or Progress()

    def calls(self) -> list[CallView]:
        """The calls known to this run, in call order."""
        return self._source.call_views() if self._source is not None else []

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for each event; returns a function that unsubscribes."""
        return self.events.subscribe(listener)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the execution finishes; False if ``timeout`` passed first."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The value of the workflow's last expression; raises if it failed or was interrupted."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"execution {self.execution_id} is still running")
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def outputs(self) -> dict[str, Any]:
        """Names the workflow assigned at top level, as host objects (after completion)."""
        return dict(self._outputs)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def begin(self) -> None:
        """Let a run started with ``paused=True`` dispatch its calls (no-op otherwise)."""
        if self._source is not None:
            self._source.begin()

    def cancel(self) -> None:
        """Stop dispatching calls; calls already running finish and their results are kept.

        The execution becomes ``interrupted`` and can be resumed later.
        """
        if self._source is not None and not self._done.is_set():
            self._source.request_stop()

    def __repr__(self) -> str:
        p = self.progress
        return f"<Run {self.key!r} {self.status} {p.done}/{p.total} calls>"
