"""A run: one execution, running or finished, as callers hold it: progress, wait, result, cancel.

A :class:`Run` reads what it shows from a :class:`RunSource`: the driver while this process
drives the execution, the store's rows once it finished (or when it came from the store).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
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
    signals: int = 0  # signal waits (``await signal(...)``) not yet answered
    external: int = 0  # calls of external functions waiting for their completion
    limited: int = 0  # calls waiting for a concurrency slot or a rate token of their function
    # The total the run will reach as far as its code says (the calls announced plus the call
    # sites not reached yet); None when the code makes an unknown number of calls (loops,
    # helpers): views then show no bar and no ETA. Equal to ``total`` once the run finished.
    expected: int | None = None

    def details(self) -> list[tuple[str, int]]:
        """(label, count) of every category besides ``done``, in display order."""
        return [
            ("running", self.running),
            ("queued", self.queued),
            ("limited", self.limited),
            ("retrying", self.retrying),
            ("failed", self.failed),
            ("waiting", self.waiting),
            ("restored", self.restored),
            ("reused", self.reused),
            ("waiting for a signal", self.signals),
            ("waiting for completion", self.external),
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
    started_at: float | None = None
    finished_at: float | None = None
    args_text: str = ""  # the arguments as stored (``[[args...], {kwargs...}]``)


@dataclass(frozen=True)
class FunctionStats:
    """The calls of one function in a run: how many, how far, how long, how many failed.

    ``mean`` and ``longest`` are durations (seconds) of the finished calls that ran here (not
    restored or reused ones), None when there are none yet.
    """

    function: str
    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    mean: float | None = None
    longest: float | None = None


def function_stats(calls: Iterable[tuple[str, str, float | None, float | None]]) -> list[FunctionStats]:
    """Per-function counts and durations of ``(function, status, started_at, finished_at)``, in order
    of first appearance; one pass over the calls."""
    table: dict[str, list[Any]] = {}
    for function, status, started, finished in calls:
        row = table.get(function)
        if row is None:  # total, done, failed, running, timed, sum, longest
            row = table[function] = [0, 0, 0, 0, 0, 0.0, None]
        row[0] += 1
        if status in ("done", "reused"):
            row[1] += 1
        elif status == "failed":
            row[2] += 1
        elif status == "running":
            row[3] += 1
        if started and finished and status in ("done", "failed"):
            duration = finished - started
            row[4] += 1
            row[5] += duration
            row[6] = duration if row[6] is None or duration > row[6] else row[6]
    return [
        FunctionStats(name, t, d, f, r, (total / timed) if timed else None, longest)
        for name, (t, d, f, r, timed, total, longest) in table.items()
    ]


LIVE_CALLS = 500  # the most call ids of one status a runner publishes (the widget shows 50 rows)
CALL_FRAME_COLUMNS = ["function", "arguments", "status", "attempts", "start", "end", "duration", "error", "worker"]


def calls_frame(calls: Sequence[CallView]) -> Any:
    """A pandas DataFrame of calls, indexed by call id: function, arguments, status, attempts,
    start and end (UTC timestamps), duration (seconds), error (its last line) and worker."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(
            "calls_frame() needs pandas, which is not installed: pip install pandas (or use run.calls())"
        ) from None
    from ..values import format_arguments

    rows = {
        "function": [c.function for c in calls],
        "arguments": [format_arguments(c.args_text, 200, 2000) if c.args_text else c.args for c in calls],
        "status": [c.status for c in calls],
        "attempts": [c.attempts for c in calls],
        "start": pd.to_datetime([c.started_at for c in calls], unit="s", utc=True),
        "end": pd.to_datetime([c.finished_at for c in calls], unit="s", utc=True),
        "duration": pd.array([c.duration for c in calls], dtype="Float64"),
        "error": [c.error for c in calls],
        "worker": [c.worker or None for c in calls],
    }
    index = pd.Index([c.call_id for c in calls], name="call", dtype="int64")
    return pd.DataFrame(rows, index=index, columns=CALL_FRAME_COLUMNS)


class RunSource(Protocol):
    """What a run's live state comes from (the driver of this process implements it)."""

    def progress(self) -> Progress: ...

    def call_views(self) -> list[CallView]: ...

    def begin(self) -> None: ...

    def request_stop(self) -> None: ...


class Run:
    """One execution, as the code that started (or found) it holds it.

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
        self._explain: Callable[[], Any] | None = None

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

    def calls_frame(self) -> Any:
        """The calls as a pandas DataFrame (see :func:`calls_frame`); needs pandas."""
        return calls_frame(self.calls())

    def function_stats(self) -> list[FunctionStats]:
        """Per-function counts and durations (one pass over the calls)."""
        stats = getattr(self._source, "function_stats", None)
        if stats is not None:
            return stats()
        return function_stats((c.function, c.status, c.started_at, c.finished_at) for c in self.calls())

    def live_calls(self, limit: int = LIVE_CALLS) -> dict[str, list[int]]:
        """The ids of the unfinished calls by what they do now (``running``, ``queued``, ...; at most
        ``limit`` each), while the run is driven here; a runner publishes them for watchers."""
        live = getattr(self._source, "live_calls", None)
        return live(limit) if live is not None and not self._done.is_set() else {}

    @property
    def lease_owner(self) -> str | None:
        """The lease owner its driver writes as, while the run is driven here (None otherwise)."""
        return getattr(self._source, "owner", None)

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

    @property
    def explainable(self) -> bool:
        """Whether :meth:`explain` can say why its calls were reused or ran (a run of a store)."""
        return self._explain is not None

    def explain(self) -> Any:
        """Why each call was reused (from which execution) or ran again (what changed): an
        ``Explanation`` (a table: text in a terminal, HTML in a notebook)."""
        if self._explain is None:
            raise ValueError(f"execution {self.execution_id[:12]} has no record to explain (not from a store)")
        return self._explain()

    def cancel(self) -> None:
        """Stop dispatching calls; calls already running finish and their results are kept.

        The execution becomes ``interrupted`` and can be resumed later.
        """
        if self._source is not None and not self._done.is_set():
            self._source.request_stop()

    @property
    def parked(self) -> bool:
        """Running, but waiting for nothing except signals and completions of external calls."""
        return not self._done.is_set() and bool(getattr(self._source, "parked", False))

    def waits(self) -> list[Any]:
        """What the run waits for from outside: signals and external calls (``signals.Wait``)."""
        if self._done.is_set() or self._source is None:
            return []
        waits = getattr(self._source, "waits", None)
        return waits() if waits is not None else []

    def signal(self, name: str, value: Any = None, *, idempotency_key: str | None = None, source: str = "run") -> Any:
        """Deliver a signal to this execution (a ``Delivery``); raises if it is not driven here."""
        deliver = getattr(self._source, "deliver", None)
        if deliver is None or self._done.is_set():
            from ..errors import DurableError

            raise DurableError(f"{self.key!r} is not running here: deliver with Engine.signal or %durable_signal")
        return deliver(name, value, idempotency_key=idempotency_key, source=source)

    def __repr__(self) -> str:
        p = self.progress
        return f"<Run {self.key!r} {self.status} {p.done}/{p.total} calls>"
