"""What the driver knows of each call, and how views see a call."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ...errors import last_line
from ...executors.base import Task
from ...values import ValueCodec, format_arguments
from ..run import CallView
from .exceptions import error_answer


class CallStatus(enum.StrEnum):
    """Where a call is: waiting for its outcome (``pending``: queued, limited, running, waiting for
    a timer or a signal), waiting for its next attempt (``retrying``), or over. Only the call book
    (:mod:`.book`) changes it."""

    PENDING = "pending"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


PENDING, RETRYING, DONE, FAILED = CallStatus.PENDING, CallStatus.RETRYING, CallStatus.DONE, CallStatus.FAILED


@dataclass(slots=True, eq=False)
class CallState:
    """One call of the execution: its identity, where it is, and its outcome once known."""

    call_id: int
    function: str
    kind: str  # call | sleep
    args_text: str
    awaited: bool
    fingerprint: str = ""
    sandbox_args: Any = None  # (args, kwargs) as the sandbox gave them; None after a restore
    status: CallStatus = PENDING  # changed by the call book only
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
    worker: str | None = None
    lost: int = 0  # attempts lost with their worker (not counted by the retry policy)
    earlier: int = 0  # attempts of runs before a fresh try after a fix (not counted by the policy either)
    deferred: int = 0  # attempts that raised RetryAfter (not counted by the policy either)
    limited: str | None = None  # waiting for a concurrency "slot" or a "rate" token
    slot: bool = False  # holds a slot of its function's gate
    timeout_at: float | None = None  # deadline of the running attempt

    @property
    def policy_attempts(self) -> int:
        """The attempts the retry policy counts: this try's, not lost ones."""
        return self.attempts - self.lost - self.earlier - self.deferred

    @property
    def view_status(self) -> str:
        if self.reused:
            return "reused"
        status = self.status
        if status is PENDING:
            if self.kind == "sleep":
                return "waiting"
            if self.task is not None:
                return "running" if self.task.started_at else "queued"
            if self.limited is not None:
                return "limited"
        return status.value

    def view(self) -> CallView:
        duration = None
        if self.started_at and self.finished_at:
            duration = self.finished_at - self.started_at
        worker = self.worker or (self.task.worker if self.task is not None else "") or ""
        return CallView(
            self.call_id,
            self.function,
            format_arguments(self.args_text),
            self.view_status,
            self.attempts,
            duration,
            last_line(self.error_text) or None,
            worker,
            self.started_at,
            self.finished_at,
            self.args_text,
        )

    def journaled_answer(self, codec: ValueCodec) -> dict[str, Any] | None:
        """What Monty gets for a call whose outcome is in the journal (None when it has none)."""
        if self.status is DONE:
            return {"return_value": codec.decode_sandbox(self.result_text)}
        if self.status is FAILED:
            return error_answer(self.error_type, self.error_message)
        return None


PHANTOM = CallState(-1, "", "call", "[]", False)
"""Stands for a call that is answered at once (an unknown function, an argument that cannot cross)."""


def stored_call_views(rows: list[Any]) -> list[CallView]:
    """Call rows of the store (``Store.load_calls``) as views show them."""
    return [
        CallState(
            row.call_id,
            row.function,
            row.kind,
            row.args,
            True,
            status=CallStatus(row.status),
            attempts=row.attempts,
            error_text=row.error,
            started_at=row.started_at,
            finished_at=row.finished_at,
            reused=row.reused_from is not None,
            worker=row.worker,
        ).view()
        for row in rows
    ]
