"""The mailbox of each execution: signals delivered to it and completions of its external calls.

A delivery is a row of ``dm_signals``: (execution, seq) with a name, a value in the store's
codec, an optional idempotency key (unique per execution: a second delivery with the same key
is ignored) and an HMAC over all of it. Deliveries wait in order until a wait of their name
takes them.

Exactly once, across a kill at any moment: the driver that holds the execution's lease reads
the oldest unconsumed deliveries of the names it waits for, hands their values to the waits,
and marks each one ``consumed_by`` the waiting call **in the same transaction** that journals
the call's result (:func:`consume`, run inside :meth:`Store.commit`). Killed before that
commit: neither the result nor the mark exists, the restarted driver waits again and takes the
same delivery. Killed after it: the call's result is journaled and the delivery is marked, so
it is never handed out again. The lease fences the commit, so two drivers never consume.

Names are checked (:func:`check_name`): letters, digits and ``_ . -``. Completions of external
calls use the reserved names ``call:<call id>:<attempt>``, which no user signal can take.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from ..errors import LeaseLost, MailboxBusy, SignalError
from .models import SIGNALS

if TYPE_CHECKING:
    from .store import Store

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
MAX_KEY_LENGTH = 200
INSERT_TRIES = 20


@dataclass(frozen=True)
class Delivery:
    """What a delivery did: its place in the mailbox, or that its idempotency key was seen."""

    execution_id: str
    name: str
    seq: int
    duplicate: bool = False
    value_text: str | None = None  # the stored value (of the earlier delivery when duplicate)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SignalError(
            f"a signal name is 1 to 100 letters, digits, '_', '.' or '-', not {name!r}"[:300],
        )
    return name


def call_signal_name(call_id: int, attempt: int) -> str:
    """The reserved mailbox name of the completion of an external call's attempt."""
    return f"call:{call_id}:{attempt}"


def _signed_text(name: str, value: str, idempotency_key: str | None) -> str:
    return f"{name}\0{value}\0{idempotency_key or ''}"


def deliver(
    store: Store,
    execution_id: str,
    name: str,
    value_text: str,
    *,
    idempotency_key: str | None = None,
    source: str = "engine",
) -> Delivery:
    """Append a delivery to the execution's mailbox (or find the one with the same idempotency key)."""
    if idempotency_key is not None and (not isinstance(idempotency_key, str) or len(idempotency_key) > MAX_KEY_LENGTH):
        raise SignalError(f"an idempotency key is a string of at most {MAX_KEY_LENGTH} characters")
    for _ in range(INSERT_TRIES):
        if idempotency_key is not None:
            found = find_by_key(store, execution_id, idempotency_key)
            if found is not None:
                return found
        try:
            with store.engine.begin() as conn:
                seq = (
                    conn.execute(select(func.max(SIGNALS.c.seq)).where(SIGNALS.c.execution_id == execution_id)).scalar()
                    or 0
                ) + 1
                conn.execute(
                    SIGNALS.insert().values(
                        execution_id=execution_id,
                        seq=seq,
                        name=name,
                        value=value_text,
                        idempotency_key=idempotency_key,
                        source=source[:32],
                        signature=store.signer.sign_text(
                            f"signal:{execution_id}:{seq}", _signed_text(name, value_text, idempotency_key)
                        ),
                        created_at=time.time(),
                        consumed_by=None,
                        consumed_at=None,
                    )
                )
        except IntegrityError:  # another process took this seq, or the same idempotency key, first
            continue
        notify(execution_id)
        return Delivery(execution_id, name, seq, False, value_text)
    raise MailboxBusy(f"could not append to the mailbox of execution {execution_id}: too much contention")


def find_by_key(store: Store, execution_id: str, idempotency_key: str) -> Delivery | None:
    """The delivery with this idempotency key (marked ``duplicate``), or None."""
    with store._reader.connect() as conn:
        row = conn.execute(
            select(SIGNALS).where(SIGNALS.c.execution_id == execution_id, SIGNALS.c.idempotency_key == idempotency_key)
        ).first()
    if row is None:
        return None
    verify(store, row)
    return Delivery(execution_id, row.name, row.seq, True, row.value)


def verify(store: Store, row: Any) -> None:
    store.signer.verify_text(
        f"signal:{row.execution_id}:{row.seq}",
        _signed_text(row.name, row.value, row.idempotency_key),
        row.signature,
        f"the delivery {row.seq} ({row.name!r}) to execution {row.execution_id}",
    )


def unconsumed(store: Store, execution_id: str, names: Iterable[str]) -> list[Any]:
    """The unconsumed deliveries of these names, oldest first, verified (a tampered one raises)."""
    wanted = sorted(set(names))
    if not wanted:
        return []
    with store._reader.connect() as conn:
        rows = conn.execute(
            select(SIGNALS)
            .where(
                SIGNALS.c.execution_id == execution_id,
                SIGNALS.c.consumed_by.is_(None),
                SIGNALS.c.name.in_(wanted),
            )
            .order_by(SIGNALS.c.seq)
        ).all()
    for row in rows:
        verify(store, row)
    return list(rows)


def mailbox(store: Store, execution_id: str, *, limit: int = 200) -> list[Any]:
    """The execution's deliveries (signals only, not call completions), newest last."""
    with store._reader.connect() as conn:
        rows = conn.execute(
            select(SIGNALS)
            .where(SIGNALS.c.execution_id == execution_id, ~SIGNALS.c.name.like("call:%"))
            .order_by(SIGNALS.c.seq.desc())
            .limit(limit)
        ).all()
    return list(reversed(rows))


def count_rows(store: Store) -> int:
    with store._reader.connect() as conn:
        return conn.execute(select(func.count()).select_from(SIGNALS)).scalar() or 0


def consume(conn: Any, execution_id: str, taken: list[tuple[int, int]], now: float) -> None:
    """Mark deliveries (seq, call id) consumed, inside the driver's commit; all or nothing."""
    for seq, call_id in taken:
        changed = conn.execute(
            update(SIGNALS)
            .where(SIGNALS.c.execution_id == execution_id, SIGNALS.c.seq == seq, SIGNALS.c.consumed_by.is_(None))
            .values(consumed_by=call_id, consumed_at=now)
        ).rowcount
        if changed != 1:
            conn.rollback()
            raise LeaseLost(f"delivery {seq} of execution {execution_id} was consumed by another process")


# -- waking drivers of this process -------------------------------------------------------------

_listeners: dict[str, set[Callable[[], None]]] = {}
_lock = threading.Lock()


def listen(execution_id: str, wake: Callable[[], None]) -> Callable[[], None]:
    """Call ``wake()`` when this process delivers to the execution; returns the unsubscribe function."""
    with _lock:
        _listeners.setdefault(execution_id, set()).add(wake)

    def stop() -> None:
        with _lock:
            found = _listeners.get(execution_id)
            if found is not None:
                found.discard(wake)
                if not found:
                    del _listeners[execution_id]

    return stop


def notify(execution_id: str) -> None:
    with _lock:
        wakes = list(_listeners.get(execution_id, ()))
    for wake in wakes:
        wake()
