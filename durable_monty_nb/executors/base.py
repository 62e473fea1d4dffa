"""What the driver hands to an executor, and what comes back."""

from __future__ import annotations

import contextvars
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class Task:
    """One attempt of one call."""

    call_id: int
    attempt: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    started_at: float = 0.0


@dataclass(slots=True)
class Outcome:
    """The end of an attempt: a value, or an exception with its formatted traceback."""

    call_id: int
    attempt: int
    ok: bool
    value: Any = None
    error: BaseException | None = None
    traceback: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0

    @classmethod
    def of(cls, task: Task, started: float, value: Any = None, error: BaseException | None = None) -> Outcome:
        """The outcome of ``task``'s attempt that started at ``started`` and ends now."""
        if error is None:
            return cls(task.call_id, task.attempt, True, value=value, started_at=started, finished_at=time.time())
        return cls(
            task.call_id,
            task.attempt,
            False,
            error=error,
            traceback=format_user_traceback(error),
            started_at=started,
            finished_at=time.time(),
        )


Done = Callable[[Outcome], None]


class Executor(Protocol):
    """Runs tasks somewhere and reports each outcome through ``done`` (from any thread)."""

    def submit(self, task: Task, done: Done) -> None: ...

    @property
    def running(self) -> int: ...

    def shutdown(self) -> None: ...


def format_user_traceback(exc: BaseException) -> str:
    """The traceback of an exception raised by user code, without the executor's own frame."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()
