"""Keeping a store small: forgetting workflows, pruning old executions, and what takes the space.

Deleting is safe while other kernels, workers and the server use the store, and resumable
after a kill at any moment:

1. **Mark** (one short transaction per batch of executions): the executions to go get the
   status ``deleting`` and lose their lease; readers stop seeing them at once (listings, reuse,
   ``find_execution``). The mark re-checks, under a lock of the key's row (which a new
   execution of the key must update), that no execution of the key holds a live lease: a
   running execution may be reusing calls of the ones about to go.
2. **Purge** (bounded batches, each its own transaction): calls, attempts, signals and the
   checkpoint of each ``deleting`` execution, then its row. A prune or forget first finishes
   every ``deleting`` execution a killed one left behind.
3. **Collect**: blobs and shipped functions no remaining row references are deleted in
   batches, those written (or re-used by a writer, which refreshes ``created_at``) since the
   collection began excepted, so a value a running execution just stored, or is about to
   refer to again, is never taken from under it.

A blob is referenced by the stored text of calls (arguments and results), attempts and
executions (``{"$h": key}``), by the checkpoints of unfinished executions (handles of the
values the workflow read), and, while a call is unfinished, as its large arguments shipped to
workers. A shipped function is referenced by the fingerprint of a remaining execution or call.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import LargeBinary, String, Text, bindparam, delete, func, select, text, update

from ..defaults import INLINE_LIMIT
from ..errors import ExecutionNotFound, ForgetRefused
from ..values import blob_key
from .mailbox import SIGNALS
from .tables import (
    AGENT_UNITS,
    ATTEMPTS,
    BLOBS,
    CALLS,
    CHECKPOINTS,
    DELETING,
    EXECUTIONS,
    FUNCTIONS,
    HANDOFFS,
    KEYS,
)

if TYPE_CHECKING:
    from .store import Store

MARK_BATCH = 20  # executions marked per transaction
ROW_BATCH = 2000  # calls, attempts or signals deleted per transaction
BLOB_BATCH = 100  # blobs or functions deleted per transaction
HANDLE = re.compile(r'"\$h":"([0-9a-f]{32})"')
AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*", re.IGNORECASE)
AGE_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(age: float | int | str | None) -> float | None:
    """Seconds from ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or a number of seconds; None stays None."""
    if age is None:
        return None
    if isinstance(age, bool):
        raise ValueError(f"an age is a duration such as '7d', '12h' or a number of seconds, not {age!r}")
    if isinstance(age, int | float):
        seconds = float(age)
    else:
        match = AGE.fullmatch(str(age))
        if match is None:
            raise ValueError(f"an age is a duration such as '7d', '12h', '30m' or '45s', not {age!r}")
        seconds = float(match.group(1)) * AGE_UNITS[(match.group(2) or "s").lower()]
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"an age must be zero or more seconds, not {age!r}")
    return seconds


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


@dataclass
class Removal:
    """What a forget or prune removed (or, with ``dry_run``, would remove)."""

    executions: list[tuple[str, str]] = field(default_factory=list)  # (id, key)
    calls: int = 0
    blobs: int = 0
    functions: int = 0
    bytes: int = 0  # the data of the removed rows, blobs and functions
    checkpoints_dropped: int = 0  # checkpoints of kept completed executions (nothing loads them)
    skipped_live: list[str] = field(default_factory=list)  # keys left alone: an execution of it runs
    dry_run: bool = False
    vacuumed: bool = False
    store_bytes_before: int | None = None
    store_bytes_after: int | None = None

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        keys = sorted({key for _, key in self.executions})
        lines = [
            f"{verb} {len(self.executions)} execution(s) of {len(keys)} workflow(s), {self.calls} call(s), "
            f"{self.blobs} stored value(s), {self.functions} shipped function(s): {format_bytes(self.bytes)}"
        ]
        if self.checkpoints_dropped:
            lines.append(f"{verb} {self.checkpoints_dropped} checkpoint(s) of completed executions")
        for key in keys:
            ids = [i[:12] for i, k in self.executions if k == key]
            lines.append(f"  {key}: {', '.join(ids)}")
        if self.skipped_live:
            lines.append(f"left alone while they run: {', '.join(sorted(self.skipped_live))}")
        if self.store_bytes_before is not None and self.store_bytes_after is not None:
            lines.append(
                f"store size {format_bytes(self.store_bytes_before)} -> {format_bytes(self.store_bytes_after)}"
                + (" (vacuumed)" if self.vacuumed else "")
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class WorkflowSize:
    key: str
    executions: int = 0
    bytes: int = 0  # its rows' data plus the blobs its rows reference (a blob shared by two counts in both)


@dataclass
class StoreSize:
    """The store's size on disk (as the database reports it) and what each workflow takes."""

    total_bytes: int | None
    workflows: dict[str, WorkflowSize]
    blob_bytes: int = 0
    unreferenced_bytes: int = 0  # blobs and functions nothing references (a prune collects them)


# -- the public operations ---------------------------------------------------------------------------


def forget(store: Store, target: str, *, force: bool = False, vacuum: bool = False) -> Removal:
    """Remove a workflow (every execution of key ``target``) or one execution (by id or id prefix).

    Refused with :class:`ForgetRefused`, changing nothing, when one of them (or, for a single
    execution, another execution of its workflow) is held by a live process, unless ``force``:
    the process driving it then loses its lease and stops at its next step.
    """
    from .owners import lease_held

    _purge_deleting(store)
    rows = _executions_of_key(store, target)
    if not rows:
        try:
            row = store.find_execution(target)
        except ExecutionNotFound:
            raise ExecutionNotFound(f"no workflow or execution {target!r} in {store.display_url}") from None
        ids = {row.id}
        key = row.key
        related = _executions_of_key(store, key)
    else:
        key = target
        ids = {r.id for r in rows}
        related = rows
    if not force:
        for row in related:
            if lease_held(row):
                raise ForgetRefused(_refusal(row, key, own=row.id in ids))
    removal = Removal()
    removal.store_bytes_before = store_size_bytes(store)
    with store._reader.connect() as conn:
        removal.bytes += _rows_bytes(conn, sorted(ids))
        removal.calls += _count_calls(conn, sorted(ids))
    removal.executions = [(r.id, r.key) for r in related if r.id in ids]
    _mark(store, key, sorted(ids), repoint=True, known=None if force else {r.id for r in related})
    _purge_deleting(store)
    blobs, functions, freed = _collect(store)
    removal.blobs, removal.functions, removal.bytes = blobs, functions, removal.bytes + freed
    if vacuum:
        removal.vacuumed = vacuum_store(store)
    removal.store_bytes_after = store_size_bytes(store)
    return removal


def _refusal(row: Any, key: str, *, own: bool) -> str:
    from .owners import describe_owner

    what = "it is" if own else f"another execution of {key!r}, {row.id[:12]}, which may be reusing its calls, is"
    return (
        f"execution {row.id[:12]} of {key!r} is live: {what} driven by {describe_owner(row.lease_owner)}. "
        f"Stop it first (interrupt or kill that process, or %durable_cancel in its kernel), or forget with "
        f"force=True (--force): that process then loses the execution at its next step."
    )


def prune(
    store: Store,
    *,
    older_than: float | int | str | None = None,
    keep_latest: int = 1,
    dry_run: bool = False,
    vacuum: bool = False,
) -> Removal:
    """Remove completed executions beyond the ``keep_latest`` most recent of each key.

    ``older_than`` (seconds, or ``"7d"``, ``"12h"``...): only those finished longer ago. An
    execution that did not complete (running, parked, crashed, interrupted, failed) is never
    removed, nor the latest execution of a key, nor anything of a key one of whose executions
    runs right now. Kept completed executions lose their checkpoint (nothing loads it again).
    Blobs and shipped functions nothing else references go too. ``dry_run``: change nothing,
    report what would go and the bytes it frees. ``vacuum``: give the space back to the disk
    (SQLite ``VACUUM``, PostgreSQL ``VACUUM``, MariaDB ``OPTIMIZE TABLE``).
    """
    from .owners import lease_held

    age = parse_age(older_than)
    if isinstance(keep_latest, bool) or not isinstance(keep_latest, int) or keep_latest < 0:
        raise ValueError(f"keep_latest must be a whole number of at least 0, not {keep_latest!r}")
    if not dry_run:
        _purge_deleting(store)
    now = time.time()
    removal = Removal(dry_run=dry_run)
    removal.store_bytes_before = store_size_bytes(store)
    with store._reader.connect() as conn:
        latest = dict(conn.execute(select(KEYS.c.key, KEYS.c.latest_execution_id)).all())
        rows = conn.execute(
            select(
                EXECUTIONS.c.id,
                EXECUTIONS.c.key,
                EXECUTIONS.c.status,
                EXECUTIONS.c.created_at,
                EXECUTIONS.c.updated_at,
                EXECUTIONS.c.finished_at,
                EXECUTIONS.c.lease_owner,
                EXECUTIONS.c.lease_expires_at,
            ).where(EXECUTIONS.c.status != DELETING)
        ).all()
    by_key: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_key[row.key].append(row)
    chosen: dict[str, list[str]] = {}
    for key, executions in by_key.items():
        if any(lease_held(r) for r in executions):
            removal.skipped_live.append(key)
            continue
        completed = sorted(
            (r for r in executions if r.status == "completed"), key=lambda r: (r.created_at, r.id), reverse=True
        )
        going = [
            r.id
            for r in completed[keep_latest:]
            if r.id != latest.get(key) and (age is None or (r.finished_at or r.updated_at) < now - age)
        ]
        if going:
            chosen[key] = going
    all_ids = [i for ids in chosen.values() for i in ids]
    with store._reader.connect() as conn:
        removal.bytes = _rows_bytes(conn, all_ids)
        removal.calls = _count_calls(conn, all_ids)
        going_ids = set(all_ids)
        kept_completed = [
            r.id
            for r in rows
            if r.status == "completed" and r.id not in going_ids and r.key not in removal.skipped_live
        ]
        removal.checkpoints_dropped = _count_checkpoints(conn, kept_completed)
    removal.executions = [(i, key) for key, ids in chosen.items() for i in ids]
    if dry_run:
        blobs, functions, freed = _collect(store, gone=set(all_ids), dry_run=True)
        removal.blobs, removal.functions, removal.bytes = blobs, functions, removal.bytes + freed
        removal.store_bytes_after = removal.store_bytes_before
        return removal
    marked: list[tuple[str, str]] = []
    for key, ids in chosen.items():
        for start in range(0, len(ids), MARK_BATCH):
            done = _mark(store, key, ids[start : start + MARK_BATCH], repoint=False, only_completed=True)
            marked += [(i, key) for i in done]
            if not done and key not in removal.skipped_live:
                removal.skipped_live.append(key)  # it started running meanwhile
    removal.executions = marked
    _purge_deleting(store)
    _drop_checkpoints(store, kept_completed)
    blobs, functions, freed = _collect(store)
    removal.blobs, removal.functions, removal.bytes = blobs, functions, removal.bytes + freed
    if vacuum:
        removal.vacuumed = vacuum_store(store)
    removal.store_bytes_after = store_size_bytes(store)
    return removal


def sizes(store: Store) -> StoreSize:
    """The store's size and, per workflow, its executions and the bytes they take."""
    workflows: dict[str, WorkflowSize] = {}
    with store._reader.connect() as conn:
        owner = dict(
            conn.execute(select(EXECUTIONS.c.id, EXECUTIONS.c.key).where(EXECUTIONS.c.status != DELETING)).all()
        )
        for key in owner.values():
            workflow = workflows.setdefault(key, WorkflowSize(key))
            workflow.executions += 1
        for execution_id, size in _bytes_by_execution(conn).items():
            key = owner.get(execution_id)
            if key is not None:
                workflows[key].bytes += size
        blob_sizes = dict(conn.execute(select(BLOBS.c.key, BLOBS.c.size)).all())
        refs = _references(conn, set(), by_execution=True)
    used: set[str] = set()
    per_key: dict[str, set[str]] = defaultdict(set)
    for execution_id, keys in refs.items():
        key = owner.get(execution_id)
        if key is not None:
            per_key[key].update(keys)
            used.update(keys)
    for key, keys in per_key.items():
        workflows[key].bytes += sum(blob_sizes.get(k, 0) for k in keys)
    return StoreSize(
        total_bytes=store_size_bytes(store),
        workflows=workflows,
        blob_bytes=sum(blob_sizes.values()),
        unreferenced_bytes=sum(size for k, size in blob_sizes.items() if k not in used),
    )


def store_size_bytes(store: Store) -> int | None:
    """The space the store takes, as its database reports it (SQLite: the file, its WAL and its blob files)."""
    try:
        with store._reader.connect() as conn:
            if store.backend == "sqlite":
                pages = conn.execute(text("PRAGMA page_count")).scalar() or 0
                size = conn.execute(text("PRAGMA page_size")).scalar() or 0
                database = store.engine.url.database
                wal = 0
                if database and database != ":memory:":
                    wal = os.path.getsize(database + "-wal") if os.path.exists(database + "-wal") else 0
                files = 0
                if store.blob_dir is not None and store.blob_dir.is_dir():  # big values kept as files
                    files = sum(entry.stat().st_size for entry in os.scandir(store.blob_dir) if entry.is_file())
                return int(pages * size + wal + files)
            names = [t.name for t in _ALL_TABLES]
            if store.backend == "postgresql":
                query = (
                    "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c "
                    "WHERE c.relname IN :names AND c.relkind = 'r' AND pg_table_is_visible(c.oid)"
                )
            else:
                query = (
                    "SELECT SUM(data_length + index_length) FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_name IN :names"
                )
            statement = text(query).bindparams(bindparam("names", expanding=True))
            found = conn.execute(statement, {"names": names}).scalar()
            return int(found or 0)
    except Exception:
        return None


def vacuum_store(store: Store) -> bool:
    """Give the space of deleted rows back (SQLite VACUUM, PostgreSQL VACUUM, MariaDB OPTIMIZE TABLE)."""
    names = [t.name for t in _ALL_TABLES]
    if store.backend == "sqlite":
        with store._reader.connect() as conn:
            raw = conn.connection.driver_connection
            raw.execute("VACUUM")
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return True
    with store.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if store.backend == "postgresql":
            conn.execute(text(f"VACUUM {', '.join(names)}"))
        else:
            conn.execute(text(f"OPTIMIZE TABLE {', '.join(names)}")).all()
    return True


# -- marking, purging, collecting --------------------------------------------------------------------


_ALL_TABLES = (EXECUTIONS, CALLS, CHECKPOINTS, BLOBS, KEYS, ATTEMPTS, FUNCTIONS, SIGNALS, AGENT_UNITS, HANDOFFS)


def _executions_of_key(store: Store, key: str) -> list[Any]:
    with store._reader.connect() as conn:
        return list(
            conn.execute(select(EXECUTIONS).where(EXECUTIONS.c.key == key, EXECUTIONS.c.status != DELETING)).all()
        )


def _locking(store: Store, statement: Any) -> Any:
    return statement if store.backend == "sqlite" else statement.with_for_update()


def _mark(
    store: Store,
    key: str,
    ids: Sequence[str],
    *,
    repoint: bool,
    only_completed: bool = False,
    known: set[str] | None = None,
) -> list[str]:
    """Mark executions of ``key`` as deleting, in one transaction; returns the ids marked.

    With ``only_completed`` (a prune) nothing is marked when an execution of the key holds a
    live lease now, and only completed executions that are not the key's latest are. With
    ``repoint`` (a forget) the key's latest moves to its newest remaining execution, or the key
    row goes with its last execution. With ``known`` (a forget without force) an execution of
    the key outside ``known`` that holds a live lease (it started since) refuses the forget.
    """
    now = time.time()
    with store.engine.begin() as conn:
        latest = conn.execute(_locking(store, select(KEYS.c.latest_execution_id).where(KEYS.c.key == key))).first()
        if only_completed or known is not None:
            live_query = select(EXECUTIONS.c.id).where(
                EXECUTIONS.c.key == key,
                EXECUTIONS.c.lease_owner.is_not(None),
                EXECUTIONS.c.lease_expires_at >= now,
                EXECUTIONS.c.status != DELETING,
            )
            if known is not None:
                live_query = live_query.where(EXECUTIONS.c.id.not_in(sorted(known)))
            live = conn.execute(_locking(store, live_query)).first()
            if live is not None and only_completed:
                return []
            if live is not None:
                row = conn.execute(select(EXECUTIONS).where(EXECUTIONS.c.id == live[0])).first()
                raise ForgetRefused(_refusal(row, key, own=False))
        query = select(EXECUTIONS.c.id).where(EXECUTIONS.c.id.in_(list(ids)), EXECUTIONS.c.status != DELETING)
        if only_completed:
            query = query.where(EXECUTIONS.c.status == "completed")
            if latest is not None and latest[0] is not None:
                query = query.where(EXECUTIONS.c.id != latest[0])
        marked = list(conn.execute(query).scalars())
        if not marked:
            return []
        conn.execute(
            update(EXECUTIONS)
            .where(EXECUTIONS.c.id.in_(marked))
            .values(status=DELETING, lease_owner=None, lease_expires_at=None, updated_at=now)
        )
        if repoint and latest is not None and latest[0] in marked:
            newest = conn.execute(
                select(EXECUTIONS.c.id)
                .where(EXECUTIONS.c.key == key, EXECUTIONS.c.status != DELETING)
                .order_by(EXECUTIONS.c.created_at.desc())
                .limit(1)
            ).scalar()
            if newest is None:
                conn.execute(delete(KEYS).where(KEYS.c.key == key))
            else:
                conn.execute(update(KEYS).where(KEYS.c.key == key).values(latest_execution_id=newest, updated_at=now))
    return marked


def _purge_deleting(store: Store) -> None:
    """Delete the rows of every execution marked deleting, in bounded batches (idempotent)."""
    with store._reader.connect() as conn:
        ids = list(conn.execute(select(EXECUTIONS.c.id).where(EXECUTIONS.c.status == DELETING)).scalars())
    _purge_orphans(store)
    for execution_id in ids:
        _purge_rows(store, CALLS, CALLS.c.call_id, execution_id)
        _purge_rows(store, ATTEMPTS, ATTEMPTS.c.attempt_id, execution_id)
        _purge_rows(store, SIGNALS, SIGNALS.c.seq, execution_id)
        _purge_rows(store, AGENT_UNITS, AGENT_UNITS.c.call_id, execution_id)
        with store.engine.begin() as conn:
            conn.execute(delete(CHECKPOINTS).where(CHECKPOINTS.c.execution_id == execution_id))
            conn.execute(delete(HANDOFFS).where(HANDOFFS.c.execution_id == execution_id))
            conn.execute(delete(EXECUTIONS).where(EXECUTIONS.c.id == execution_id, EXECUTIONS.c.status == DELETING))


def _purge_orphans(store: Store) -> None:
    """Attempts, signals and agent units of executions that no longer exist (a worker finishing an attempt of a
    forgotten execution keeps its outcome rather than lose it)."""
    with store._reader.connect() as conn:  # the rows first: an execution created since has none of them
        seen = {
            t.name: set(conn.execute(select(t.c.execution_id).distinct()).scalars())
            for t in (ATTEMPTS, SIGNALS, AGENT_UNITS)
        }
        existing = set(conn.execute(select(EXECUTIONS.c.id)).scalars())
    orphans = {name: ids - existing for name, ids in seen.items()}
    for table, order in (
        (ATTEMPTS, ATTEMPTS.c.attempt_id),
        (SIGNALS, SIGNALS.c.seq),
        (AGENT_UNITS, AGENT_UNITS.c.call_id),
    ):
        for execution_id in sorted(orphans[table.name]):
            _purge_rows(store, table, order, execution_id)


def _purge_rows(store: Store, table: Any, order: Any, execution_id: str) -> None:
    with store._reader.connect() as conn:
        keys = list(conn.execute(select(order).where(table.c.execution_id == execution_id).order_by(order)).scalars())
    for start in range(0, len(keys), ROW_BATCH):
        chunk = keys[start : start + ROW_BATCH]
        with store.engine.begin() as conn:
            conn.execute(
                delete(table).where(table.c.execution_id == execution_id, order >= chunk[0], order <= chunk[-1])
            )


def _drop_checkpoints(store: Store, execution_ids: Sequence[str]) -> None:
    """Checkpoints of completed executions: a completed execution is answered from its result."""
    for chunk in _chunks(list(execution_ids), BLOB_BATCH):
        with store.engine.begin() as conn:
            done = select(EXECUTIONS.c.id).where(EXECUTIONS.c.id.in_(chunk), EXECUTIONS.c.status == "completed")
            conn.execute(delete(CHECKPOINTS).where(CHECKPOINTS.c.execution_id.in_(done)))


def _collect(store: Store, *, gone: set[str] | None = None, dry_run: bool = False) -> tuple[int, int, int]:
    """Delete (or count, with ``dry_run``) blobs and functions nothing outside ``gone`` references.

    Returns (blobs, functions, bytes). Rows written or re-used since the collection began are kept.
    """
    gone = set(gone or ())
    cutoff = time.time()
    with store._reader.connect() as conn:
        referenced = _references(conn, gone)
        blobs = {
            row.key: row.size
            for row in conn.execute(select(BLOBS.c.key, BLOBS.c.size).where(BLOBS.c.created_at < cutoff))
            if row.key not in referenced
        }
        if blobs:
            blobs = {k: v for k, v in blobs.items() if k not in _checkpoint_references(conn, gone, set(blobs))}
        fingerprints = _function_references(conn, gone)
        functions = {
            row.key: row.size
            for row in conn.execute(
                select(FUNCTIONS.c.key, FUNCTIONS.c.fingerprint, func.length(FUNCTIONS.c.data).label("size")).where(
                    FUNCTIONS.c.created_at < cutoff
                )
            )
            if row.fingerprint not in fingerprints
        }
    if dry_run:
        return len(blobs), len(functions), sum(blobs.values()) + sum(int(v or 0) for v in functions.values())
    freed = 0
    counts = []
    for table, found in ((BLOBS, blobs), (FUNCTIONS, functions)):
        removed = 0
        for chunk in _chunks(sorted(found), BLOB_BATCH):
            trashed: list[tuple[Path, Path]] = []
            try:
                with store.engine.begin() as conn:
                    # created_at re-checked: a writer that found the row and re-used it refreshed it
                    statement = delete(table).where(table.c.key.in_(chunk), table.c.created_at < cutoff)
                    removed += conn.execute(statement).rowcount
                    if table is BLOBS and store.blob_dir is not None:
                        _trash_blob_files(store, conn, chunk, trashed)
            except BaseException:
                for path, trash in trashed:  # the rows are back: so are their files
                    with contextlib.suppress(OSError):
                        trash.rename(path)
                raise
            for _, trash in trashed:
                with contextlib.suppress(OSError):
                    trash.unlink()
            freed += sum(int(found[k] or 0) for k in chunk)
        counts.append(removed)
    if store.blob_dir is not None and store.blob_dir.is_dir():
        freed += _sweep_blob_files(store)
    return counts[0], counts[1], freed


def _trash_blob_files(store: Store, conn: Any, keys: Sequence[str], trashed: list[tuple[Path, Path]]) -> None:
    """Rename the files of the blobs whose rows this transaction deleted, while it holds the store's
    write lock (a writer writes files under it too); the caller removes them once it committed."""
    kept = set(conn.execute(select(BLOBS.c.key).where(BLOBS.c.key.in_(list(keys)))).scalars())
    for key in keys:
        if key in kept:
            continue
        path = store.blob_path(key)
        trash = path.with_name(f".{key}.deleted")
        try:
            path.rename(trash)
        except FileNotFoundError:
            continue  # a blob kept in its row
        trashed.append((path, trash))


def _sweep_blob_files(store: Store) -> int:
    """Remove the files of the blob folder no row names (a writer killed while writing one, a step
    rolled back after writing its files, a prune killed before removing what it renamed); returns
    their bytes. Under the write lock: no writer is between writing its files and committing."""
    assert store.blob_dir is not None
    freed = 0
    with store.engine.begin() as conn:
        keys = set(conn.execute(select(BLOBS.c.key)).scalars())
        for entry in os.scandir(store.blob_dir):
            if entry.is_file() and (entry.name.startswith(".") or entry.name not in keys):
                with contextlib.suppress(OSError):
                    size = entry.stat().st_size
                    os.unlink(entry.path)
                    freed += size
    return freed


def _references(conn: Any, gone: set[str], *, by_execution: bool = False) -> Any:
    """Blob keys referenced by the stored text of rows of executions not in ``gone``.

    A set, or with ``by_execution`` a dict {execution id: set of keys}.
    """
    found: dict[str, set[str]] = defaultdict(set)
    deleting = set(conn.execute(select(EXECUTIONS.c.id).where(EXECUTIONS.c.status == DELETING)).scalars())
    skip = gone | deleting

    def scan(statement: Any) -> None:
        for row in conn.execute(statement):
            execution_id = row[0]
            if execution_id in skip:
                continue
            for value in row[1:]:
                if value and '"$h"' in value:
                    found[execution_id].update(HANDLE.findall(value))

    pattern = '%"$h"%'
    scan(
        select(CALLS.c.execution_id, CALLS.c.args, CALLS.c.result).where(
            CALLS.c.args.like(pattern) | CALLS.c.result.like(pattern)
        )
    )
    scan(
        select(EXECUTIONS.c.id, EXECUTIONS.c.result, EXECUTIONS.c.outputs).where(
            EXECUTIONS.c.result.like(pattern) | EXECUTIONS.c.outputs.like(pattern)
        )
    )
    scan(select(ATTEMPTS.c.execution_id, ATTEMPTS.c.result).where(ATTEMPTS.c.result.like(pattern)))
    scan(select(SIGNALS.c.execution_id, SIGNALS.c.value).where(SIGNALS.c.value.like(pattern)))
    scan(select(AGENT_UNITS.c.execution_id, AGENT_UNITS.c.result).where(AGENT_UNITS.c.result.like(pattern)))
    scan(select(HANDOFFS.c.execution_id, HANDOFFS.c.inputs).where(HANDOFFS.c.inputs.like(pattern)))
    # Large arguments of unfinished calls travel to workers as blobs of their text.
    unfinished = conn.execute(
        select(CALLS.c.execution_id, CALLS.c.args).where(
            CALLS.c.status != "done", func.length(CALLS.c.args) > INLINE_LIMIT // 4
        )
    )
    for execution_id, args in unfinished:
        if execution_id not in skip and len(args) > INLINE_LIMIT:
            found[execution_id].add(blob_key(args.encode()))
    if by_execution:
        return found
    return set().union(*found.values()) if found else set()


def _checkpoint_references(conn: Any, gone: set[str], candidates: set[str]) -> set[str]:
    """Which candidate blobs the checkpoints of unfinished executions hold handles of."""
    held: set[str] = set()
    rows = conn.execute(
        select(CHECKPOINTS.c.execution_id, CHECKPOINTS.c.data, CHECKPOINTS.c.compression)
        .join(EXECUTIONS, EXECUTIONS.c.id == CHECKPOINTS.c.execution_id)
        .where(EXECUTIONS.c.status.not_in(["completed", DELETING]))
    )
    for execution_id, data, compression in rows:
        if execution_id in gone:
            continue
        raw = zlib.decompress(data) if compression == "zlib" else data
        for key in candidates - held:
            if bytes.fromhex(key) in raw or key.encode() in raw:
                held.add(key)
    return held


def _function_references(conn: Any, gone: set[str]) -> set[str]:
    skip = gone | set(conn.execute(select(EXECUTIONS.c.id).where(EXECUTIONS.c.status == DELETING)).scalars())
    fingerprints: set[str] = set()
    for execution_id, stored in conn.execute(select(EXECUTIONS.c.id, EXECUTIONS.c.fingerprints)):
        if execution_id in skip or not stored:
            continue
        try:
            fingerprints.update(json.loads(stored).get("functions", {}).values())
        except (ValueError, AttributeError):
            continue
    for execution_id, fingerprint in conn.execute(select(CALLS.c.execution_id, CALLS.c.fingerprint).distinct()):
        if execution_id not in skip:
            fingerprints.add(fingerprint)
    return fingerprints


def _data_bytes(table: Any) -> Any:
    """SQL: the bytes of a row's values (text and binary by their length, the rest as 8)."""
    parts = []
    for column in table.c:
        if isinstance(column.type, String | Text | LargeBinary):
            parts.append(func.coalesce(func.length(column), 0))
        else:
            parts.append(8)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _bytes_by_execution(conn: Any, ids: Sequence[str] | None = None) -> dict[str, int]:
    sizes: dict[str, int] = defaultdict(int)
    for table, column in (
        (EXECUTIONS, EXECUTIONS.c.id),
        (CALLS, CALLS.c.execution_id),
        (CHECKPOINTS, CHECKPOINTS.c.execution_id),
        (ATTEMPTS, ATTEMPTS.c.execution_id),
        (SIGNALS, SIGNALS.c.execution_id),
        (AGENT_UNITS, AGENT_UNITS.c.execution_id),
    ):
        chunks: Iterable[Sequence[str] | None] = _chunks(list(ids), 500) if ids is not None else [None]
        for chunk in chunks:
            query = select(column, func.sum(_data_bytes(table))).group_by(column)
            if chunk is not None:
                query = query.where(column.in_(chunk))
            for execution_id, size in conn.execute(query):
                sizes[execution_id] += int(size or 0)
    return sizes


def _rows_bytes(conn: Any, ids: Sequence[str]) -> int:
    return sum(_bytes_by_execution(conn, ids).values()) if ids else 0


def _count_calls(conn: Any, ids: Sequence[str]) -> int:
    total = 0
    for chunk in _chunks(list(ids), 500):
        total += conn.execute(select(func.count()).where(CALLS.c.execution_id.in_(chunk))).scalar() or 0
    return total


def _count_checkpoints(conn: Any, ids: Sequence[str]) -> int:
    total = 0
    for chunk in _chunks(list(ids), 500):
        total += conn.execute(select(func.count()).where(CHECKPOINTS.c.execution_id.in_(chunk))).scalar() or 0
    return total


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
