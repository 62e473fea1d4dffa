"""Exceptions raised by durable-monty-nb.

Every error a user can meet says what went wrong, where, and what to do about it.
"""

from __future__ import annotations


class DurableError(Exception):
    """Base class of every durable-monty-nb error.

    ``http_status`` is how the HTTP server answers a request this error refuses (by the class,
    never by the message): 400 unless a subclass says otherwise.
    """

    http_status = 400

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of the extension's internal frames."""
        return [f"{type(self).__name__}: {self}"]


class WorkflowCodeError(DurableError):
    """The workflow code cannot run: bad syntax, an unsupported feature, or unknown names.

    Raised before anything runs; nothing is stored.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class UnknownNamesError(WorkflowCodeError):
    """The workflow code uses names that the namespace does not define."""

    def __init__(
        self,
        names: dict[str, int],
        resumable: str | None = None,
        unavailable: dict[str, str | None] | None = None,
        suggestions: dict[str, str] | None = None,
    ) -> None:
        self.names = names
        self.suggestions = suggestions or {}  # a defined name close to each unknown one
        unavailable = unavailable or {}
        parts = []
        undefined = {n: line for n, line in names.items() if n not in unavailable}
        if undefined:
            listed = ", ".join(
                f"{n!r} (line {line}{f', did you mean {self.suggestions[n]!r}?' if n in self.suggestions else ''})"
                for n, line in sorted(undefined.items(), key=lambda i: i[1])
            )
            parts.append(
                f"not defined in the namespace: {listed}. Define them (run the cells that do), then run again."
            )
        for name, substitute in unavailable.items():
            hint = f" Catch {substitute}, its nearest base class, instead." if substitute else ""
            parts.append(
                f"{name!r} (line {names[name]}) is a Python builtin that workflow code (the Monty "
                f"sandbox) does not have.{hint}"
            )
        if resumable:
            parts.append(f"Nothing was lost: {resumable}")
        super().__init__(" ".join(parts), line=min(names.values()) if names else None)


class ValueCrossingError(DurableError):
    """A value cannot cross between the notebook and the workflow sandbox."""


class WorkflowFailed(DurableError):
    """The workflow raised an exception it did not handle.

    ``traceback`` is the workflow's traceback (lines of the workflow code) followed, when a
    call caused it, by that call's own traceback. The execution stays in the store and can be
    resumed after a fix.
    """

    def __init__(self, message: str, traceback: str, execution_id: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback
        self.execution_id = execution_id
        self.error_type = error_type

    def __str__(self) -> str:
        return self.traceback or super().__str__()

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: the workflow raised an exception it did not handle", *str(self).splitlines()]


class ExecutionInterrupted(DurableError):
    """The execution was cancelled or interrupted before it finished; it can be resumed."""


def interrupted_error(execution_id: str, key: str) -> ExecutionInterrupted:
    return ExecutionInterrupted(
        f"execution {execution_id} ({key!r}) was interrupted before it finished; run it again or "
        f"resume it to continue where it stopped"
    )


class WorkerLost(DurableError):
    """A call's attempt was lost with its worker (killed, or its queue flushed); it runs again."""


class ExecutorUnavailable(DurableError):
    """The executor cannot be reached (Redis down, no Dask scheduler at the address)."""


class ExecutionBusy(DurableError):
    """Another live process (or run) drives this execution right now."""

    http_status = 409


class NotCancellable(DurableError):
    """Nothing to cancel: the execution finished, or it runs in a kernel this process cannot reach
    (no runner drives it)."""

    http_status = 409


class ForgetRefused(ExecutionBusy):
    """An execution to forget is running or parked in a live process (it holds its lease)."""


class ExecutionNotFound(DurableError):
    """No execution with this name or id exists in the store."""

    http_status = 404


class MissingFunctionsError(DurableError):
    """A resume needs functions the namespace does not define (yet)."""


class StoreError(DurableError):
    """The store cannot be used as it is."""

    http_status = 503


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection dropped, server restarting, database locked),
    and retrying for a while did not help."""


class StoreVersionError(StoreError):
    """The store was written by another schema version."""


class TamperedDataError(StoreError):
    """A stored row failed its integrity check; it is refused and never loaded."""


class LeaseLost(DurableError):
    """This process no longer owns the execution (another process took it over)."""

    http_status = 409


class SignalError(DurableError):
    """A delivery that cannot be accepted (bad name, bad idempotency key, unstorable value)."""


class ExecutionCompleted(SignalError):
    """A delivery to an execution that has completed: nothing waits for it any more."""

    http_status = 409


class MailboxBusy(SignalError):
    """The mailbox could not take a delivery: too many writers at once (try again)."""

    http_status = 409


class NoSuchCall(SignalError):
    """A completion for a call the execution does not have (or that is not an external call)."""

    http_status = 404


def last_line(text: str | None) -> str:
    """The last non-blank line of a traceback (where the exception and its message are)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""
