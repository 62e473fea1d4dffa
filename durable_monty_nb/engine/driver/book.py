"""The call book: the calls of one execution, their answers, their counters and their journal.

It is the only code that moves a call from one status to another, each move a named transition
(``transition_<from>_<to>``, as ``distributed``'s scheduler names them):

```
            transition_pending_done ------> DONE
PENDING --- transition_pending_failed ----> FAILED --- transition_failed_pending ---> PENDING
            transition_pending_retrying --> RETRYING - transition_retrying_pending -> PENDING
```

A call is done five ways (served from an earlier execution, restored from the store, returned by
its function, a sleep that ended, a signal that arrived): all through
:meth:`CallBook.transition_pending_done`, which gives Monty its answer, counts it and journals
it. Every transition that changes what the store holds queues the call's row for the next commit
(:meth:`CallBook.take_journal`). Other threads (views) read :meth:`CallBook.snapshot`: counts
taken together under one lock, never half of a transition; and :meth:`CallBook.unfinished_states`,
the calls neither done nor failed (kept by the transitions, so live views need not walk every
call of a long execution).

The book knows nothing of Monty, the store or threads beyond that lock; it is unit-tested alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

from .calls import DONE, FAILED, PENDING, RETRYING, CallState, CallStatus

__all__ = ["DONE", "FAILED", "PENDING", "RETRYING", "CallBook", "CallStatus", "Counters", "IllegalTransition"]


@dataclass
class Counters:
    """How many calls are where; a copy of them is a consistent snapshot."""

    total: int = 0
    done: int = 0
    failed: int = 0
    restored: int = 0
    reused: int = 0
    retrying: int = 0
    waiting: int = 0  # sleeps not over yet


class IllegalTransition(RuntimeError):
    """A transition from a status the call is not in (a bug of the driver, never of user code)."""


class CallBook:
    """See the module docstring."""

    def __init__(self) -> None:
        self.calls: dict[int, CallState] = {}
        # The calls neither done nor failed, in the order of ``calls`` unless ``_unfinished_unordered``
        # (a failed call tried again goes back at the end); written under the lock.
        self._unfinished: dict[int, CallState] = {}
        self._unfinished_unordered = False
        self.answers: dict[int, dict[str, Any]] = {}  # what Monty gets, by call id, until it takes it
        self.counters = Counters()
        self.failed_by_error: dict[tuple[str, str], CallState] = {}  # (type, message) -> the call that raised it
        self._journal: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------

    def snapshot(self) -> Counters:
        """The counters, all taken at one moment (for other threads)."""
        with self._lock:
            return replace(self.counters)

    def unfinished_states(self) -> list[CallState]:
        """The calls neither done nor failed, in call order (a copy, for other threads; a call may
        end meanwhile)."""
        with self._lock:
            if not self._unfinished_unordered:
                return list(self._unfinished.values())
            states = list(self.calls.values())
        return [state for state in states if state.status is not DONE and state.status is not FAILED]

    def take_journal(self) -> list[dict[str, Any]]:
        """The call rows changed since the last take, for the next commit (every column, so rows
        stay signed right)."""
        journal, self._journal = self._journal, []
        return journal

    # -- calls coming and going ------------------------------------------------------------------

    def add(self, state: CallState) -> None:
        """A new call, announced by Monty (pending)."""
        if state.status is not PENDING:
            raise IllegalTransition(f"call {state.call_id} is announced {state.status}, not pending")
        with self._lock:
            self.calls[state.call_id] = state
            self._unfinished[state.call_id] = state
            self.counters.total += 1
            if state.kind == "sleep":
                self.counters.waiting += 1

    def add_many(self, states: list[CallState]) -> None:
        """New calls announced together (a batched gather): one take of the lock."""
        calls = self.calls
        for state in states:
            if state.status is not PENDING:
                raise IllegalTransition(f"call {state.call_id} is announced {state.status}, not pending")
        unfinished = self._unfinished
        with self._lock:
            for state in states:
                calls[state.call_id] = unfinished[state.call_id] = state
            self.counters.total += len(states)

    def restore(self, state: CallState, *, retry_failed: bool, answer: Any = None) -> None:
        """A call rebuilt from its stored row: done and (unless ``retry_failed``) failed calls get
        their journaled answer (``answer``, or the state's own); the others wait again."""
        status = CallStatus(state.status)
        state.status = PENDING
        self.add(state)
        if status is DONE:
            self.transition_pending_done(state, state.result_text, answer, restored=True, journal=False)
        elif status is FAILED and not retry_failed:
            self._enter_failed(state, answer)
        elif status is FAILED:  # a fresh try after a fix: the policy starts over (attempt ids go on)
            state.earlier = state.attempts
        elif status is RETRYING:
            state.status = RETRYING
            with self._lock:
                self.counters.retrying += 1

    def forget(self, call_ids: set[int]) -> None:
        """Calls announced but never checkpointed (the sandbox crashed): Monty announces them again."""
        with self._lock:
            for call_id in call_ids:
                state = self.calls.pop(call_id, None)
                if state is None:
                    continue
                self._unfinished.pop(call_id, None)
                c = self.counters
                c.total -= 1
                if state.status is DONE:
                    c.done -= 1
                    c.reused -= state.reused
                elif state.status is FAILED:
                    c.failed -= 1
                elif state.status is RETRYING:
                    c.retrying -= 1
                elif state.kind == "sleep":
                    c.waiting -= 1
                self.answers.pop(call_id, None)

    # -- transitions -----------------------------------------------------------------------------

    def transition_pending_done(
        self,
        state: CallState,
        result_text: str | None,
        answer: dict[str, Any] | None = None,
        *,
        reused: bool = False,
        restored: bool = False,
        journal: bool = True,
    ) -> None:
        """The call is done (every way a call gets done): its result, Monty's answer (default: the
        result decoded by the caller, ``answer``), the counters and, unless the row already says
        so, the journal."""
        self._expect(state, PENDING)
        state.status, state.result_text, state.reused = DONE, result_text, state.reused or reused
        if not restored and state.kind != "sleep":  # a sleep's row keeps its due time
            state.error_text = state.error_type = state.error_message = state.due_at = None
        if answer is not None:
            self.answers[state.call_id] = answer
        with self._lock:
            self._end(state)
            c = self.counters
            c.done += 1
            c.reused += reused
            c.restored += restored
            if state.kind == "sleep":
                c.waiting -= 1
        if journal:
            self.journal(state)

    def transition_pending_failed(
        self,
        state: CallState,
        error_type: str,
        error_message: str,
        error_text: str,
        finished_at: float | None,
        answer: dict[str, Any],
    ) -> None:
        """The call failed for good: the exception the workflow gets (``answer``), counted, journaled."""
        self._expect(state, PENDING)
        state.error_type, state.error_message, state.error_text = error_type, error_message, error_text
        state.finished_at, state.result_text, state.due_at = finished_at, None, None
        self._enter_failed(state, answer)
        self.journal(state)

    def transition_pending_retrying(
        self, state: CallState, due_at: float, *, error_text: str | None = None, error_type: str | None = None
    ) -> None:
        """The attempt failed (or asked to wait); the next one starts at ``due_at``."""
        self._expect(state, PENDING)
        state.status, state.due_at = RETRYING, due_at
        if error_text is not None:
            state.error_text, state.error_type = error_text, error_type
        with self._lock:
            self.counters.retrying += 1
        self.journal(state)

    def transition_retrying_pending(self, state: CallState) -> None:
        """The next attempt of a retrying call is dispatched."""
        self._expect(state, RETRYING)
        state.status = PENDING
        with self._lock:
            self.counters.retrying -= 1

    def transition_failed_pending(self, state: CallState) -> None:
        """A failed call tried again (the cell ran again after a fix)."""
        self._expect(state, FAILED)
        state.status = PENDING
        with self._lock:
            self.counters.failed -= 1
            self._unfinished[state.call_id] = state  # at the end: its place is read from ``calls``
            self._unfinished_unordered = True

    def journal(self, state: CallState) -> None:
        """Queue the call's row for the next commit (also for changes that keep its status)."""
        self._journal.append(
            {
                "call_id": state.call_id,
                "status": state.status.value if isinstance(state.status, CallStatus) else state.status,
                "attempts": state.attempts,
                "result": state.result_text,
                "error": state.error_text,
                "error_type": state.error_type,
                "error_message": state.error_message,
                "due_at": state.due_at,
                "started_at": state.started_at,
                "finished_at": state.finished_at,
                "worker": state.worker,
            }
        )

    # -- internals -------------------------------------------------------------------------------

    def _enter_failed(self, state: CallState, answer: Any) -> None:
        state.status = FAILED
        if answer is not None:
            self.answers[state.call_id] = answer
        self.failed_by_error[(state.error_type or "", state.error_message or "")] = state
        with self._lock:
            self._end(state)
            self.counters.failed += 1

    def _end(self, state: CallState) -> None:
        """The call is done or failed (under the lock): no longer unfinished."""
        unfinished = self._unfinished
        unfinished.pop(state.call_id, None)
        if not unfinished:  # in call order again
            self._unfinished_unordered = False

    @staticmethod
    def _expect(state: CallState, status: CallStatus) -> None:
        if state.status is not status:
            raise IllegalTransition(
                f"call {state.call_id} ({state.function}) is {state.status}, not {status.value}: "
                f"it cannot move from {status.value}"
            )
