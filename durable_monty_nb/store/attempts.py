"""The outcome of one attempt as workers write it: a signed record, in the store and on the wire.

A worker writes the record to ``dm_attempts`` and hands the same record (its result left out
when large) to the job or future that notifies the driver. The driver verifies the signature
of every record, wherever it came from: a forged notification or a tampered row is refused.
What the driver makes of a record (an executor's ``Outcome``) is in
:mod:`durable_monty_nb.executors.record`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import TamperedDataError
from .signing import Signer

FINISHED = ("done", "failed")


@dataclass(slots=True)
class AttemptRecord:
    attempt_id: str
    execution_id: str
    call_id: int
    attempt: int
    status: str  # dispatched | done | failed | lost
    executor: str = ""
    worker: str = ""
    result: str | None = None
    error_types: str | None = None  # JSON list
    error_message: str | None = None
    traceback: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    signature: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def signed_text(self) -> str:
        parts = (
            self.status,
            self.worker or "",
            self.result or "",
            self.error_types or "",
            self.error_message or "",
            self.traceback or "",
            repr(self.started_at),
            repr(self.finished_at),
        )
        return "\0".join(parts)

    def sign(self, signer: Signer) -> AttemptRecord:
        self.signature = signer.sign_text(f"attempt:{self.attempt_id}", self.signed_text())
        return self

    def verify(self, signer: Signer) -> AttemptRecord:
        signer.verify_text(
            f"attempt:{self.attempt_id}",
            self.signed_text(),
            self.signature,
            f"the outcome of attempt {self.attempt} of call {self.call_id} (execution {self.execution_id})",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The record's fields, by name (all plain values: ``dataclasses.asdict`` would deep-copy
        each one, a third of a trivial call's time on a Dask worker)."""
        return {name: getattr(self, name) for name in ATTEMPT_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttemptRecord:
        try:
            return cls(**data)
        except TypeError as exc:
            raise TamperedDataError(f"a malformed attempt record was refused: {exc}") from None


ATTEMPT_FIELDS = tuple(f.name for f in fields(AttemptRecord))
"""The fields of a record, in order: the columns of ``dm_attempts`` a record reads and writes."""
