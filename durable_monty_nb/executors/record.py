"""What the driver makes of attempt records (:mod:`durable_monty_nb.store.attempts`): outcomes.

A record comes from the store (``dm_attempts``) or from the wire (the message a worker hands to
its job or future); either way its signature is verified before its outcome is believed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..store.attempts import FINISHED, AttemptRecord
from ..store.signing import Signer
from .base import ErrorInfo, Outcome

__all__ = ["FINISHED", "AttemptRecord", "error_of", "error_types_text", "outcome_from_wire", "outcome_of"]


def error_types_text(error: ErrorInfo) -> str:
    """What a record keeps of an error besides its message and traceback (``error_types``): the
    JSON list of its class names, or, with a delay, ``{"types": [...], "retry_after": seconds}``."""
    if error.retry_after is None:
        return json.dumps(error.types)
    return json.dumps({"types": error.types, "retry_after": error.retry_after})


def error_of(record: AttemptRecord) -> ErrorInfo:
    """The error of a failed record (see :func:`error_types_text`)."""
    found = json.loads(record.error_types or '["builtins.Exception"]')
    retry_after = None
    if isinstance(found, dict):
        found, retry_after = found.get("types") or ["builtins.Exception"], found.get("retry_after")
    delay = float(retry_after) if isinstance(retry_after, (int, float)) else None
    return ErrorInfo(tuple(found), record.error_message or "", record.traceback or "", delay)


def outcome_of(record: AttemptRecord) -> Outcome:
    """The outcome a finished record reports."""
    if record.status == "done":
        return Outcome(
            record.call_id,
            record.attempt,
            True,
            result=record.result,
            started_at=record.started_at or 0.0,
            finished_at=record.finished_at or 0.0,
            worker=record.worker,
        )
    error = error_of(record)
    return Outcome(
        record.call_id,
        record.attempt,
        False,
        error=error,
        started_at=record.started_at or 0.0,
        finished_at=record.finished_at or 0.0,
        worker=record.worker,
    )


def outcome_from_wire(message: dict[str, Any], signer: Signer) -> Outcome:
    """The outcome a worker's message reports (see ``worker.wire``); signed records are verified.

    Raises TamperedDataError for a record whose signature does not match.
    """
    if "record" in message:
        return outcome_of(AttemptRecord.from_dict(message["record"]).verify(signer))
    if message.get("in_store"):
        return Outcome(message["call_id"], message["attempt"], True, in_store=True)
    error = message.get("error") or {}
    info = ErrorInfo(
        tuple(error.get("types") or ("builtins.Exception",)),
        str(error.get("message", "")),
        str(error.get("traceback", "")),
    )
    return Outcome(
        message["call_id"],
        message["attempt"],
        False,
        error=info,
        finished_at=time.time(),
        worker=message.get("worker", ""),
    )
