"""Hand-overs of detached executions to runners: written by the kernel that detaches a run, read,
claimed and ended by ``durable-monty-nb runner`` (see :mod:`durable_monty_nb.engine.detached`).

A hand-over is signed over its identity and content. Its ``key_id`` (a tag derived from the
signing key, which does not reveal it) lets a runner with another key say so, rather than call
the hand-over tampered. Claiming an execution is its lease (:meth:`Store.acquire_lease`), never
this row: the row only says that runners should drive it, and who did last.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import insert, select, update

from ..errors import TamperedDataError
from ..values import BlobData
from .signing import KEY_ENV, KEY_FILE_ENV, Signer
from .store import Store
from .tables import EXECUTIONS, HANDOFFS
from .transient import retrying

F = TypeVar("F", bound=Callable[..., Any])


def _retried(operation: F) -> F:
    """Through transient database errors, as the store's own operations (StoreUnavailable after its
    retry window); every operation here may run twice (each one is idempotent)."""

    @functools.wraps(operation)
    def wrapper(store: Store, *args: Any, **kwargs: Any) -> Any:
        return retrying(lambda: operation(store, *args, **kwargs), store.display_url, window=store.retry_window)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Handoff:
    """What a runner needs to drive a detached execution (decoded from its row)."""

    execution_id: str
    executor: str
    options: dict[str, Any]
    inputs: dict[str, str]  # name -> value in the store's codec
    functions: dict[str, str]  # name -> key of its pickle in dm_functions
    armed: bool
    cancel_requested_at: float | None
    runner: str | None
    claimed_at: float | None
    refusal: str | None
    created_at: float
    signature: str
    key_id: str
    updated_at: float = 0.0
    progress: dict[str, Any] | None = None  # live counts its runner wrote (not signed: shown only)

    def content(self) -> str:
        """The signed text: everything a runner acts on."""
        return json.dumps(
            [self.executor, self.options, self.inputs, self.functions], sort_keys=True, separators=(",", ":")
        )


def key_id(signer: Signer) -> str:
    """A short tag of the signing key (an HMAC of a constant): equal keys give equal tags."""
    return signer.sign("key-id", b"durable-monty-nb")[:16]


def _context(execution_id: str) -> str:
    return f"handoff:{execution_id}"


def _row_values(
    store: Store,
    execution_id: str,
    executor: str,
    options: dict[str, Any],
    inputs: dict[str, str],
    functions: dict[str, str],
    now: float,
) -> dict[str, Any]:
    draft = Handoff(execution_id, executor, options, inputs, functions, True, None, None, None, None, now, "", "")
    return {
        "execution_id": execution_id,
        "executor": executor,
        "options": json.dumps(options, sort_keys=True),
        "inputs": json.dumps(inputs, sort_keys=True),
        "functions": json.dumps(functions, sort_keys=True),
        "signature": store.signer.sign_text(_context(execution_id), draft.content()),
        "key_id": key_id(store.signer),
        "armed": 1,
        "cancel_requested_at": None,
        "refusal": None,
        "progress": None,
        "updated_at": now,
    }


@_retried
def write_handoff(
    store: Store,
    execution_id: str,
    *,
    executor: str,
    options: dict[str, Any],
    inputs: dict[str, str],
    functions: dict[str, tuple[str, str, bytes]],
    blobs: dict[str, tuple[bytes | BlobData, str]],
) -> None:
    """Hand an execution over (or again, armed, with what the kernel reads now): its signed row,
    with the shipped functions (``{key: (name, fingerprint, pickle)}``) and the blobs its inputs
    refer to, in one transaction."""
    now = time.time()
    names = {name: key for key, (name, _, _) in functions.items()}
    values = _row_values(store, execution_id, executor, options, inputs, names, now)
    with store.engine.begin() as conn:
        if blobs:
            store._insert_blobs(conn, blobs, now)
        if functions:
            store._insert_functions(conn, functions, now)
        changed = conn.execute(
            update(HANDOFFS).where(HANDOFFS.c.execution_id == execution_id).values(**values)
        ).rowcount
        if not changed:
            conn.execute(insert(HANDOFFS), {**values, "created_at": now, "runner": None, "claimed_at": None})


@_retried
def load_handoff(store: Store, execution_id: str) -> Handoff | None:
    with store._reader.connect() as conn:
        row = conn.execute(select(HANDOFFS).where(HANDOFFS.c.execution_id == execution_id)).first()
    return _decode(row) if row is not None else None


@_retried
def armed_handoffs(store: Store) -> list[Handoff]:
    """Hand-overs runners should drive, oldest first."""
    with store._reader.connect() as conn:
        rows = conn.execute(select(HANDOFFS).where(HANDOFFS.c.armed == 1).order_by(HANDOFFS.c.created_at)).all()
    return [_decode(row) for row in rows]


@_retried
def handoffs_of(store: Store, execution_ids: list[str]) -> dict[str, Handoff]:
    if not execution_ids:
        return {}
    with store._reader.connect() as conn:
        rows = conn.execute(select(HANDOFFS).where(HANDOFFS.c.execution_id.in_(execution_ids))).all()
    return {row.execution_id: _decode(row) for row in rows}


def verify_handoff(store: Store, handoff: Handoff) -> None:
    """Raise TamperedDataError unless the hand-over is signed with this process's key, naming a
    key mismatch as such."""
    mine = key_id(store.signer)
    if handoff.key_id != mine:
        raise TamperedDataError(
            f"execution {handoff.execution_id[:12]} was handed over with another signing key (key id "
            f"{handoff.key_id}) than this process's (key id {mine}): it is left for a runner that has that key. "
            f"Give this runner the key of the notebook's kernel ({KEY_ENV}, or the key file {KEY_FILE_ENV} names)."
        )
    store.signer.verify_text(
        _context(handoff.execution_id),
        handoff.content(),
        handoff.signature,
        f"the hand-over of execution {handoff.execution_id[:12]}",
    )


@_retried
def mark_claimed(store: Store, execution_id: str, runner: str) -> None:
    now = time.time()
    with store.engine.begin() as conn:
        conn.execute(
            update(HANDOFFS)
            .where(HANDOFFS.c.execution_id == execution_id)
            .values(runner=runner[:255], claimed_at=now, refusal=None, updated_at=now)
        )


@_retried
def mark_refused(store: Store, execution_id: str, message: str) -> None:
    """Say why a runner would not drive it (the row stays armed: a runner with the key may)."""
    now = time.time()
    with store.engine.begin() as conn:
        conn.execute(
            update(HANDOFFS).where(HANDOFFS.c.execution_id == execution_id).values(refusal=message, updated_at=now)
        )


@_retried
def write_progress(store: Store, execution_id: str, progress: dict[str, Any]) -> None:
    """The live counts of a run its runner drives (running, queued, ...), for watchers to show."""
    with store.engine.begin() as conn:
        conn.execute(
            update(HANDOFFS)
            .where(HANDOFFS.c.execution_id == execution_id)
            .values(progress=json.dumps(progress, sort_keys=True))
        )


@_retried
def disarm(store: Store, execution_id: str) -> None:
    """No runner drives it any more (it ended, or it was cancelled)."""
    now = time.time()
    with store.engine.begin() as conn:
        conn.execute(update(HANDOFFS).where(HANDOFFS.c.execution_id == execution_id).values(armed=0, updated_at=now))


@_retried
def request_cancel(store: Store, execution_id: str) -> bool:
    """Ask the runner that drives it to stop it (an unclaimed one stops at once: interrupted).

    False when the execution has no armed hand-over.
    """
    now = time.time()
    with store.engine.begin() as conn:
        changed = conn.execute(
            update(HANDOFFS)
            .where(HANDOFFS.c.execution_id == execution_id, HANDOFFS.c.armed == 1)
            .values(cancel_requested_at=now, updated_at=now)
        ).rowcount
    return bool(changed)


@_retried
def interrupt_unclaimed(store: Store, execution_id: str) -> bool:
    """A cancelled hand-over nobody drives: disarmed, and a running execution becomes interrupted,
    in one transaction fenced by the free lease. False when someone holds the lease."""
    now = time.time()
    free = (EXECUTIONS.c.lease_owner.is_(None)) | (EXECUTIONS.c.lease_expires_at < now)
    with store.engine.begin() as conn:
        found = conn.execute(select(EXECUTIONS.c.status).where(EXECUTIONS.c.id == execution_id, free)).first()
        if found is None:
            return False
        if found.status == "running":
            changed = conn.execute(
                update(EXECUTIONS)
                .where(EXECUTIONS.c.id == execution_id, EXECUTIONS.c.status == "running", free)
                .values(status="interrupted", lease_owner=None, lease_expires_at=None, updated_at=now)
            ).rowcount
            if not changed:
                return False
        conn.execute(update(HANDOFFS).where(HANDOFFS.c.execution_id == execution_id).values(armed=0, updated_at=now))
    return True


def _decode(row: Any) -> Handoff:
    return Handoff(
        execution_id=row.execution_id,
        executor=row.executor,
        options=json.loads(row.options),
        inputs=json.loads(row.inputs),
        functions=json.loads(row.functions),
        armed=bool(row.armed),
        cancel_requested_at=row.cancel_requested_at,
        runner=row.runner,
        claimed_at=row.claimed_at,
        refusal=row.refusal,
        created_at=row.created_at,
        signature=row.signature,
        key_id=row.key_id,
        updated_at=row.updated_at,
        progress=_progress(row.progress),
    )


def _progress(text: str | None) -> dict[str, Any] | None:
    """Counts as written by a runner; anything else (a row edited by hand) reads as none."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    counts: dict[str, Any] = {
        k: v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0
    }
    if isinstance(data.get("note"), str):
        counts["note"] = data["note"][:500]
    if isinstance(data.get("owner"), str):  # the lease owner that wrote them
        counts["owner"] = data["owner"]
    calls = data.get("calls")
    if isinstance(calls, dict):  # status -> call ids
        counts["calls"] = {
            status: [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
            for status, ids in calls.items()
            if isinstance(status, str) and isinstance(ids, list)
        }
    return counts
