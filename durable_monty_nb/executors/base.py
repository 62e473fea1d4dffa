"""The executor seam: what the driver hands to an executor, and what comes back.

A :class:`Task` describes one attempt of one call as data (function name and key, arguments in
the store's codec, execution, call and attempt), so it can run in another process or on
another machine. In-process executors also get the live callable and arguments (``local``),
which spares them a round trip through the store.

An :class:`Outcome` carries a value (in-process) or the stored text of the result (remote),
or an :class:`ErrorInfo`: the exception's class names, message and traceback text. Nothing
relies on the exception object itself, which may not unpickle where the outcome is read.

Every executor implements :class:`Executor`; its capability flags tell the driver what it can
rely on (as joblib's parallel backends do).
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


def attempt_id(execution_id: str, call_id: int, attempt: int) -> str:
    """The durable id of an attempt (RQ job id, Dask key); letters, digits and dashes only."""
    return f"dm-{execution_id}-{call_id}-{attempt}"


@dataclass(slots=True)
class LocalCall:
    """The live callable and arguments of a task, for executors in the driver's process."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


@dataclass(slots=True, eq=False)
class Task:
    """One attempt of one call, described by data.

    ``function_key`` names the signed pickle of the function in the store (remote executors);
    ``args`` is ``[[args...], {kwargs...}]`` in the store's codec; when it is large it is also
    a blob of the store (``args_blob``) and remote executors send only that key. ``started_at`` and
    ``worker`` are filled in by the executor when it learns them.
    """

    execution_id: str
    call_id: int
    attempt: int
    function: str
    function_key: str = ""
    args: str = "[[],{}]"
    args_blob: str = ""
    local: LocalCall | None = None
    started_at: float = 0.0
    worker: str = ""

    @property
    def id(self) -> str:
        return attempt_id(self.execution_id, self.call_id, self.attempt)


@dataclass(slots=True, frozen=True)
class ErrorInfo:
    """An exception by name: fully qualified class names of its MRO, message, traceback text,
    and ``retry_after``: the seconds it asks to wait before its call runs again (a
    ``RetryAfter``'s), carried as a number wherever the attempt ran."""

    types: tuple[str, ...]
    message: str
    traceback: str
    retry_after: float | None = None

    @classmethod
    def of(cls, exc: BaseException, traceback_text: str | None = None) -> ErrorInfo:
        return cls(
            exception_types(type(exc)),
            exception_message(exc),
            format_user_traceback(exc) if traceback_text is None else traceback_text,
            retry_after_of(exc),
        )

    @property
    def type_name(self) -> str:
        """The short class name (``ValueError``, ``MyError``)."""
        return self.types[0].rsplit(".", 1)[-1] if self.types else "Exception"

    def is_a(self, classes: Sequence[type[BaseException]]) -> bool:
        """Whether the exception is an instance of one of ``classes`` (matched by name)."""
        names = set(self.types)
        return any(f"{c.__module__}.{c.__qualname__}" in names for c in classes)


@dataclass(slots=True)
class Outcome:
    """The end of an attempt: a value (``value`` or stored ``result``), an error, or lost.

    ``lost`` means the attempt will never report (its worker died, its queue was flushed):
    the driver runs it again. ``in_store`` means the (large) result is only in the store.
    """

    call_id: int
    attempt: int
    ok: bool
    value: Any = None
    result: str | None = None
    error: ErrorInfo | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    worker: str = ""
    lost: bool = False
    in_store: bool = False

    @classmethod
    def of(cls, task: Task, started: float, value: Any = None, error: BaseException | None = None) -> Outcome:
        """The outcome of ``task``'s attempt that started at ``started`` and ends now."""
        now = time.time()
        if error is None:
            return cls(task.call_id, task.attempt, True, value=value, started_at=started, finished_at=now)
        return cls(task.call_id, task.attempt, False, error=ErrorInfo.of(error), started_at=started, finished_at=now)

    @classmethod
    def lost_attempt(cls, task: Task, reason: str) -> Outcome:
        info = ErrorInfo(("durable_monty_nb.errors.WorkerLost",), reason, f"WorkerLost: {reason}")
        return cls(task.call_id, task.attempt, False, error=info, finished_at=time.time(), lost=True)


Done = Callable[[Outcome], None]


class Executor(Protocol):
    """Runs tasks somewhere and reports each outcome through ``done`` (from any thread).

    Capability flags:

    - ``name``: ``threads``, ``rq``, ``dask``: recorded with each durable attempt.
    - ``remote``: tasks run in other processes; they need the function pickled in the store
      and their arguments in the store's codec (``Task.local`` is not set).
    - ``durable``: attempts outlive this process. The driver journals each attempt before
      dispatching it and, on resume, asks :meth:`attach` about the ones without an outcome.
    - ``pin_safe`` (optional, default False): every thread the executor starts gives itself
      every CPU back first (``cpus.unpin_this_thread``), so the driver may run on one CPU with
      its Monty worker (:mod:`durable_monty_nb.cpus`).

    Optional methods (the driver looks for them):

    - ``withdraw(tasks) -> list[Task]``: take back the attempts not started yet (a stop); they
      never run. Returns those taken back.
    - ``hold()`` and ``release()``: start no queued attempt from now on, and undo that. A stop
      request holds the executor from the thread that asks, so nothing starts in the moment
      before the driver withdraws; only the thread pool has them (a remote worker may take a
      job in that moment: withdrawing it is a round trip to its service anyway).
    """

    name: str
    remote: bool
    durable: bool

    def submit(self, tasks: Sequence[Task], done: Done) -> None:
        """Start the tasks (in order); never blocks on their execution."""
        ...

    def attach(self, tasks: Sequence[Task], done: Done) -> list[Task]:
        """Follow attempts dispatched by an earlier process; return those that are lost.

        Only durable executors are asked.
        """
        ...

    def cancel(self, tasks: Sequence[Task]) -> None:
        """Stop attempts the driver no longer waits for (timed out), as far as the backend can.

        Their outcomes, if they still come, are ignored by the driver.
        """
        ...

    def counts(self) -> tuple[int, int]:
        """(queued, running) attempts of this executor, cheap enough for every progress tick."""
        ...

    @property
    def problem(self) -> str | None:
        """What keeps tasks from progressing right now (shown in views), or None."""
        ...

    def shutdown(self) -> None:
        """Stop accepting tasks; attempts already running go on (and report if durable)."""
        ...


class WatchedExecutor:
    """What the remote executors (RQ, Dask) share: submitting (``_send``, defined by each), the
    attempts in flight, one watcher thread per run that reports their outcomes (``_loop``, defined
    by each), and the Health views show."""

    name = "remote"
    remote = True
    durable = True

    def __init__(self, run: Any, health: Health) -> None:
        self.run = run
        self._health = health
        self._tasks: dict[str, Task] = {}  # attempts in flight, by id
        self._unsent: list[Task] = []  # waiting for the service to come back
        self._done: Done | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def problem(self) -> str | None:
        return self._health.problem

    def submit(self, tasks: Sequence[Task], done: Done) -> None:
        self._expect(tasks, done)
        self._send(list(tasks))
        self._watch()

    def _send(self, tasks: list[Task]) -> None:
        """Hand the attempts to the service (each backend's); on failure keep them in ``_unsent``."""
        raise NotImplementedError

    def _expect(self, tasks: Sequence[Task], done: Done) -> None:
        """From now on, outcomes of these attempts go to ``done``."""
        with self._lock:
            self._done = done
            for task in tasks:
                self._tasks[task.id] = task

    def _watch(self) -> None:
        """Start the watcher thread (once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, daemon=True, name=f"durable-{self.name}-{self.run.execution_id[:8]}"
                )
                self._thread.start()

    def _loop(self) -> None:
        raise NotImplementedError

    def _forget(self, task_id: str) -> None:
        """Drop what the executor keeps for an attempt that reported (called with the lock held)."""

    def _report(self, task_id: str, outcome: Outcome) -> None:
        """Pass an attempt's outcome to the driver, once."""
        with self._lock:
            task = self._tasks.pop(task_id, None)
            self._forget(task_id)
            done = self._done
        if task is not None and done is not None:
            done(outcome)


class Health:
    """What keeps an executor's tasks from progressing, as views show it (``Executor.problem``).

    ``service`` names what the executor talks to (``Redis at URL``); ``no_worker`` is what to
    say when tasks wait and no worker is there for ``grace`` seconds. Thread-safe enough for
    one watcher thread writing and views reading.
    """

    def __init__(self, service: str, no_worker: str, grace: float = 3.0) -> None:
        self.service = service
        self.no_worker = no_worker
        self.grace = grace
        self.problem: str | None = None
        self.down_since: float | None = None
        self._idle_since: float | None = None

    def unreachable(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.time()
        since = time.strftime("%H:%M:%S", time.localtime(self.down_since))
        self.problem = f"cannot reach {self.service} since {since}, retrying ({exc})"

    def reachable(self) -> None:
        if self.down_since is not None:
            self.down_since = None
            self.problem = None

    def workers(self, *, waiting: bool, present: bool) -> None:
        """Record whether tasks wait and whether any worker is there to take them."""
        if waiting and not present:
            now = time.monotonic()
            self._idle_since = self._idle_since or now
            if now - self._idle_since >= self.grace:
                self.problem = self.no_worker
            return
        self._idle_since = None
        if self.down_since is None:
            self.problem = None


def retry_after_of(exc: BaseException) -> float | None:
    """The delay an exception asks for (its ``retry_after`` attribute: seconds, 0 or more), or None."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def exception_types(cls: type[BaseException]) -> tuple[str, ...]:
    """Fully qualified names of a class and its bases, most specific first."""
    return tuple(f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__ if c is not object)


def exception_message(error: BaseException) -> str:
    """The message as the sandbox shows it: builtins keep theirs, others get their class name."""
    message = str(error.args[0]) if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    if type(error).__module__ != "builtins":
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return message


def format_user_traceback(exc: BaseException) -> str:
    """The traceback of an exception raised by user code, without the executor's own frame."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()
