"""The store: executions, their calls, checkpoints and blobs, in any SQLAlchemy database.

Writes of a running execution go through :meth:`Store.commit`, one transaction per step of
the driver, fenced by the execution's lease: a process that lost its lease cannot write.
SQLite runs in WAL mode with ``synchronous=FULL`` (a committed step survives power loss) and
``BEGIN IMMEDIATE`` transactions (no lock-upgrade deadlocks between processes). On PostgreSQL a
small step is one statement in autocommit, its own transaction and one round trip
(:meth:`Store._step_statement`).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Row, bindparam, create_engine, event, insert, literal_column, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from ..defaults import DURABILITY, DURABILITY_LEVELS, SQLITE_BUSY_TIMEOUT, STORE_RETRY_WINDOW
from ..errors import ExecutionNotFound, LeaseLost, StoreError, TamperedDataError
from ..values import BlobData, big_blob_digest, content_matches
from . import mailbox
from .attempts import ATTEMPT_FIELDS, FINISHED, AttemptRecord
from .keys import scoped_key
from .owners import (  # noqa: F401  (where they were before owners.py)
    _proc_stat,
    _process_start,
    describe_owner,
    execution_state,
    lease_held,
    machine_id,
    new_owner,
    owner_is_dead,
    release_owner,
)
from .schema import ensure_schema
from .signing import Signer, secret_argument
from .tables import AGENT_UNITS, ATTEMPTS, BLOBS, CALLS, CHECKPOINTS, DELETING, EXECUTIONS, FUNCTIONS, KEYS
from .transient import cause, retrying


def _retried(method: Any) -> Any:
    """Retry a store method through transient database errors (see :mod:`.transient`)."""

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        return retrying(lambda: method(self, *args, **kwargs), self._shown_url, window=self.retry_window)

    return wrapper


DEFAULT_DB_FILE = "durable_monty.db"
DEFAULT_DB_DIR = ".durable"  # the default store's hidden folder, in the notebook's folder
CALL_FIELDS = (
    "call_id",
    "function",
    "kind",
    "args",
    "fingerprint",
    "status",
    "attempts",
    "result",
    "error",
    "error_type",
    "error_message",
    "result_sig",
    "due_at",
    "started_at",
    "finished_at",
    "reused_from",
    "worker",
    "gather_id",
)
COMPRESS_ABOVE = 16 * 1024
BLOB_DIR_SUFFIX = "-blobs"  # a SQLite file store keeps its big values in <database>-blobs/
FILE_BLOB = "blob-file"  # the signing context of a blob kept as a file (its row signs its BLAKE3)
CALL_TAG = 32  # hex digits of a call row's HMAC (128 bits): rows stored by the ten thousand
IN_CHUNK = 500
UNFINISHED = ("running", "interrupted", "failed")


def default_db_path(folder: str | os.PathLike[str] | None = None) -> Path:
    """The default store of a folder (default: the working directory).

    ``durable_monty.db`` when the folder has one (stores written before the hidden folder was
    the default), else ``.durable/durable_monty.db``, out of sight of file browsers.
    """
    base = Path(folder if folder is not None else Path.cwd()).expanduser().resolve()
    legacy = base / DEFAULT_DB_FILE
    return legacy if legacy.exists() else base / DEFAULT_DB_DIR / DEFAULT_DB_FILE


def prepare_default_folder(url: str) -> None:
    """Create the hidden folder of a default store (``.durable``, ignored by git) if it is missing."""
    if not url.startswith("sqlite:///"):
        return
    folder = Path(url.removeprefix("sqlite:///")).parent
    if folder.name != DEFAULT_DB_DIR or folder.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("# the durable-monty-nb store of this folder\n*\n")


def normalize_url(url: str | os.PathLike[str] | None) -> str:
    """A SQLAlchemy URL from a URL, a file path, or None (:func:`default_db_path` of the working directory)."""
    if url is None:
        url = default_db_path()
    url = os.fspath(url)
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


SQLITE_BEGIN_WRITE = "BEGIN IMMEDIATE"  # a writer's transaction takes the write lock at once


def _make_engine(url: str, immediate: bool, durability: str = DURABILITY) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True, future=True)
        if durability == "process" and parsed.get_backend_name() == "postgresql":

            @event.listens_for(engine, "connect")
            def _asynchronous_commit(dbapi_conn: Any, _record: Any) -> None:
                with dbapi_conn.cursor() as cursor:  # the server acknowledges before its WAL is flushed
                    cursor.execute("SET synchronous_commit = off")
                dbapi_conn.commit()

        return engine
    memory = parsed.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT}}
    if memory:
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_conn.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL" if durability == "full" else "PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
        # 16 MB of page cache (2 MB by default): the index of 100,000 call keys, written in
        # random order by a gather's insert, stays in it.
        cursor.execute("PRAGMA cache_size=-16384")
        cursor.close()

    begin = SQLITE_BEGIN_WRITE if immediate else "BEGIN"

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.connection.driver_connection.execute(begin)  # straight to sqlite3: once per transaction

    return engine


def pending_call_row(
    execution_id: str,
    call_id: int,
    function: str,
    fingerprint: str,
    args: str,
    call_key: str,
    *,
    kind: str = "call",
    due_at: float | None = None,
    gather_id: int | None = None,
) -> dict[str, Any]:
    """The row of a call as a step journals it when the call is announced: pending, no result."""
    return {
        "execution_id": execution_id,
        "call_id": call_id,
        "function": function[:255],
        "kind": kind,
        "fingerprint": fingerprint,
        "args": args,
        "call_key": call_key,
        "status": "pending",
        "attempts": 0,
        "due_at": due_at,
        "result": None,
        "reused_from": None,
        "worker": None,
        "gather_id": gather_id,
    }


@dataclass
class Step:
    """Everything one driver step writes, committed in one transaction."""

    new_calls: list[dict[str, Any]] = field(default_factory=list)
    call_updates: list[dict[str, Any]] = field(default_factory=list)
    blobs: dict[str, tuple[bytes | BlobData, str]] = field(default_factory=dict)
    checkpoint: bytes | None = None
    execution: dict[str, Any] = field(default_factory=dict)
    # Remote executors: functions shipped by value {key: (name, fingerprint, pickle)}, the
    # attempts about to be dispatched (rows of dm_attempts), and attempt ids found lost.
    functions: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    lost_attempts: list[str] = field(default_factory=list)
    # Mailbox deliveries (seq, call id) taken by waits in this step (see store/mailbox.py).
    consumed_signals: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.new_calls
            or self.call_updates
            or self.blobs
            or self.checkpoint is not None
            or self.execution
            or self.functions
            or self.attempts
            or self.lost_attempts
            or self.consumed_signals
        )


class Store:
    """A durable-monty store at a SQLAlchemy URL (or a SQLite file path)."""

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        secret: bytes | str | None = None,
        durability: str = DURABILITY,
        key: bytes | str | None = None,
    ) -> None:
        secret = secret_argument(secret, key, "Store")
        if durability not in DURABILITY_LEVELS:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY_LEVELS)}, not {durability!r}")
        self.durability = durability
        self.url = normalize_url(url)
        self.backend = make_url(self.url).get_backend_name()
        try:
            prepare_default_folder(self.url)
            self.engine = _make_engine(self.url, immediate=True, durability=durability)
            if self.backend == "sqlite":
                self._reader = _make_engine(self.url, immediate=False, durability=durability)
            else:
                self._reader = self.engine
            if self.backend == "sqlite" and make_url(self.url).database in (None, "", ":memory:"):
                self._reader = self.engine
            ensure_schema(self.engine, self.display_url)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot open the store {self.display_url}: {cause(exc)}") from exc
        self.signer = Signer(secret)
        database = make_url(self.url).database if self.backend == "sqlite" else None
        # Big values of a SQLite file store live as files beside it (see _write_blob_files).
        in_file = database and database != ":memory:" and not database.startswith("file:")
        self.blob_dir = Path(database + BLOB_DIR_SUFFIX).resolve() if in_file else None
        self.checkpoint_seq: dict[str, int] = {}
        self.retry_window = STORE_RETRY_WINDOW
        self.pid = os.getpid()
        self._shown_url = self.display_url
        self._writers = threading.local()  # each driver thread keeps one connection for its steps
        # PostgreSQL through psycopg 3: a small step is one statement, its own transaction.
        self._one_statement = self.backend == "postgresql" and self.engine.dialect.driver == "psycopg"

    @property
    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()
        if self._reader is not self.engine:
            self._reader.dispose()

    # -- executions ---------------------------------------------------------------------

    @_retried
    def latest_execution(self, key: str) -> Row | None:
        with self._reader.connect() as conn:
            latest = conn.execute(select(KEYS.c.latest_execution_id).where(KEYS.c.key == key)).scalar()
            if latest is None:
                return None
            return conn.execute(select(EXECUTIONS).where(EXECUTIONS.c.id == latest)).first()

    @_retried
    def get_execution(self, execution_id: str) -> Row:
        with self._reader.connect() as conn:
            row = conn.execute(select(EXECUTIONS).where(EXECUTIONS.c.id == execution_id)).first()
        if row is None:
            raise ExecutionNotFound(f"no execution {execution_id!r} in {self.display_url}")
        return row

    def find_execution(self, name_or_id: str, *, notebook: str | None = None) -> Row:
        """The execution a user means: ``notebook``'s workflow of that name (when a notebook is
        given), else the latest execution of that key, else the execution with this id (or id prefix).

        The one resolver of names and ids: the magics, the command line and the HTTP server use it.
        """
        key = scoped_key(notebook, name_or_id)
        if key != name_or_id:
            row = self.latest_execution(key)
            if row is not None:
                return row
        row = self.latest_execution(name_or_id)
        if row is not None:
            return row
        with self._reader.connect() as conn:
            rows = conn.execute(
                select(EXECUTIONS)
                .where(EXECUTIONS.c.id.like(f"{name_or_id}%"), EXECUTIONS.c.status != DELETING)
                .limit(2)
            ).all()
        if len(rows) == 1:
            return rows[0]
        if len(rows) > 1:
            raise ExecutionNotFound(f"{name_or_id!r} matches several execution ids; give more of the id")
        # A plain name of a notebook's workflow (its key is NOTEBOOK::NAME), when one notebook has it.
        with self._reader.connect() as conn:
            pattern = "%::" + name_or_id.replace("!", "!!").replace("%", "!%").replace("_", "!_")
            keys = sorted(k for (k,) in conn.execute(select(KEYS.c.key).where(KEYS.c.key.like(pattern, escape="!"))))
        keys = [k for k in keys if k.rpartition("::")[2] == name_or_id]
        if len(keys) == 1:
            found = self.latest_execution(keys[0])
            if found is not None:
                return found
        if len(keys) > 1:
            raise ExecutionNotFound(
                f"{name_or_id!r} is a workflow of {len(keys)} notebooks: {', '.join(keys)}; give the whole key"
            )
        raise ExecutionNotFound(f"no execution named or with id {name_or_id!r} in {self.display_url}")

    @_retried
    def list_executions(self, *, latest_only: bool = True, key: str | None = None) -> list[Row]:
        query = select(EXECUTIONS).where(EXECUTIONS.c.status != DELETING).order_by(EXECUTIONS.c.created_at.desc())
        if key is not None:
            query = query.where(EXECUTIONS.c.key == key)
        elif latest_only:
            query = query.where(EXECUTIONS.c.id.in_(select(KEYS.c.latest_execution_id)))
        with self._reader.connect() as conn:
            return list(conn.execute(query).all())

    @_retried
    def unfinished_executions(self) -> list[Row]:
        """Latest executions of their keys that did not complete and nobody alive drives."""
        return [r for r in self.list_executions() if r.status in UNFINISHED and not lease_held(r)]

    def rename_key(self, old: str, new: str) -> bool:
        """Move the executions of key ``old`` (and so the calls later executions reuse) to key ``new``.

        How a notebook takes over a workflow of a store written before keys were scoped by
        notebook. Returns False, changing nothing, when ``new`` exists already or ``old`` does not.
        """
        now = time.time()
        try:
            with self.engine.begin() as conn:
                if conn.execute(select(KEYS.c.key).where(KEYS.c.key == new)).first() is not None:
                    conn.rollback()
                    return False
                moved = conn.execute(update(KEYS).where(KEYS.c.key == old).values(key=new, updated_at=now)).rowcount
                if moved != 1:
                    conn.rollback()
                    return False
                conn.execute(update(EXECUTIONS).where(EXECUTIONS.c.key == old).values(key=new))
        except IntegrityError:  # another process took ``new`` at the same moment
            return False
        return True

    def create_execution(
        self, values: dict[str, Any], owner: str, lease_ttl: float, expected_latest: str | None
    ) -> bool:
        """Insert an execution owned by ``owner`` and make it the latest of its key.

        Returns False, writing nothing, when another process changed the key's latest
        execution since ``expected_latest`` was read. Retried through transient errors; a
        create whose acknowledgement was lost is recognised by its execution row.
        """

        def landed() -> bool | None:
            with self._reader.connect() as conn:
                found = conn.execute(select(EXECUTIONS.c.id).where(EXECUTIONS.c.id == values["id"])).scalar()
            return True if found is not None else None

        return retrying(
            lambda: self._create_execution(values, owner, lease_ttl, expected_latest),
            self._shown_url,
            window=self.retry_window,
            landed=landed,
        )

    def _create_execution(
        self, values: dict[str, Any], owner: str, lease_ttl: float, expected_latest: str | None
    ) -> bool:
        now = time.time()
        row = {
            **values,
            "lease_owner": owner,
            "lease_expires_at": now + lease_ttl,
            "created_at": now,
            "updated_at": now,
            "calls_total": 0,
            "calls_done": 0,
            "calls_failed": 0,
            "calls_reused": 0,
        }
        if expected_latest is None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(KEYS), {"key": row["key"], "latest_execution_id": row["id"], "updated_at": now})
                    conn.execute(insert(EXECUTIONS), row)
            except IntegrityError:  # another process created the key first, or this one did (a lost ack)
                return self._created(row["id"])
            return True
        with self.engine.begin() as conn:
            swapped = conn.execute(
                update(KEYS)
                .where(KEYS.c.key == row["key"], KEYS.c.latest_execution_id == expected_latest)
                .values(latest_execution_id=row["id"], updated_at=now)
            ).rowcount
            if swapped == 1:
                conn.execute(insert(EXECUTIONS), row)
                return True
            conn.rollback()
        return self._created(row["id"])  # another process swapped first, or this one did (a lost ack)

    def _created(self, execution_id: str) -> bool:
        """Whether an earlier try of this create committed (its acknowledgement lost with its connection):
        a retry then collides with its own write, which must not read as another process's."""
        with self.engine.connect() as conn:
            return conn.execute(select(EXECUTIONS.c.id).where(EXECUTIONS.c.id == execution_id)).scalar() is not None

    @_retried
    def acquire_lease(self, execution_id: str, owner: str, ttl: float) -> str | None:
        """Take the lease of an execution. Returns None on success, else the live owner."""
        now = time.time()
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(EXECUTIONS)
                .where(
                    EXECUTIONS.c.id == execution_id,
                    or_(
                        EXECUTIONS.c.lease_owner.is_(None),
                        EXECUTIONS.c.lease_owner == owner,
                        EXECUTIONS.c.lease_expires_at < now,
                    ),
                )
                .values(lease_owner=owner, lease_expires_at=now + ttl, updated_at=now)
            ).rowcount
            if taken:
                return None
            current = conn.execute(select(EXECUTIONS.c.lease_owner).where(EXECUTIONS.c.id == execution_id)).scalar()
            if current is None or not owner_is_dead(current):
                return current or "unknown"
            taken = conn.execute(
                update(EXECUTIONS)
                .where(EXECUTIONS.c.id == execution_id, EXECUTIONS.c.lease_owner == current)
                .values(lease_owner=owner, lease_expires_at=now + ttl, updated_at=now)
            ).rowcount
            if taken:
                return None
            # Another process took it over first: name that one, not the dead owner.
            now_owner = conn.execute(select(EXECUTIONS.c.lease_owner).where(EXECUTIONS.c.id == execution_id)).scalar()
            return now_owner or "unknown"

    @_retried
    def release_lease(self, execution_id: str, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(EXECUTIONS)
                .where(EXECUTIONS.c.id == execution_id, EXECUTIONS.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    # -- the driver's transaction ---------------------------------------------------------

    def commit(self, execution_id: str, owner: str, lease_ttl: float, step: Step) -> None:
        """Write one step atomically; raise LeaseLost (writing nothing) if ``owner`` lost the lease.

        Transient errors are retried (:mod:`.transient`). A commit whose acknowledgement was lost
        is recognised by the execution's ``updated_at``, which each step sets to its own time, so
        a step is never applied twice; StoreUnavailable when the store stays unreachable.
        """
        now = time.time()

        def landed() -> bool | None:
            with self._reader.connect() as conn:
                written = conn.execute(select(EXECUTIONS.c.updated_at).where(EXECUTIONS.c.id == execution_id)).scalar()
            return True if written == now else None

        retrying(
            lambda: self._commit(execution_id, owner, lease_ttl, step, now),
            self._shown_url,
            window=self.retry_window,
            landed=landed,
        )

    def _writer(self) -> Any:
        """This thread's connection for steps, kept between them: a driver commits hundreds of
        steps a second, and checking a connection out of the pool (with its pre-ping on a
        server database) for each one cost more than the step's own statements."""
        conn = getattr(self._writers, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self._writers.conn = self.engine.connect()
        return conn

    def release_writer(self) -> None:
        """Return this thread's step connection to the pool (a driver does this when it ends)."""
        conn = getattr(self._writers, "conn", None)
        self._writers.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection is discarded by the pool
                conn.close()

    def _commit(self, execution_id: str, owner: str, lease_ttl: float, step: Step, now: float) -> None:
        conn = self._writer()
        try:
            if self._one_statement and _one_statement_fits(step):
                self._step_statement(conn, execution_id, owner, lease_ttl, step, now)
                return
            if self.backend == "sqlite" and _writes_only(step):
                self._sqlite_step(conn, execution_id, owner, lease_ttl, step, now)
                return
            with conn.begin():
                self._write_step(conn, execution_id, owner, lease_ttl, step, now)
        except BaseException:
            self.release_writer()  # a retry starts on a fresh connection
            raise

    def _sqlite_step(self, conn: Any, execution_id: str, owner: str, lease_ttl: float, step: Step, now: float) -> None:
        """A step on SQLite in a transaction of the DBAPI connection: every statement of a step
        that only writes goes to its cursor anyway, and SQLAlchemy's transaction (its object, its
        events, its commit) cost about 35 µs a step, a tenth of a sequential step's commit."""
        raw = conn.connection.driver_connection
        raw.execute(SQLITE_BEGIN_WRITE)
        try:
            self._write_step(conn, execution_id, owner, lease_ttl, step, now)
        except BaseException:
            if raw.in_transaction:  # the connection is released after this (a retry starts afresh)
                with contextlib.suppress(sqlite3.Error):
                    raw.execute("ROLLBACK")
            raise
        raw.execute("COMMIT")

    def _step_statement(
        self, conn: Any, execution_id: str, owner: str, lease_ttl: float, step: Step, now: float
    ) -> None:
        """A small step on PostgreSQL as one statement, in one round trip and its own transaction
        (the connection in autocommit for it): the lease fence, then the step's writes, each a
        data-modifying ``WITH`` that only writes when the fence updated the execution row.

        When the fence updated no row (another process holds the lease), the statement divides
        by that count: it fails, nothing of it is written, and LeaseLost is raised as by
        :meth:`_write_step`. The statement's text depends only on the step's shape (a sequential
        loop repeats one), so psycopg prepares it once.
        """
        import psycopg

        values = {**step.execution, "lease_expires_at": now + lease_ttl, "updated_at": now}
        if "lease_owner" in values:  # the final step releases the lease
            values.update(lease_owner=None, lease_expires_at=None)
        exec_columns = tuple(values)
        params: list[Any] = [*values.values(), execution_id, owner]
        call_columns: tuple[str, ...] = ()
        if step.new_calls:
            for row in step.new_calls:
                row["created_at"] = now
                row["result_sig"] = self.sign_call(execution_id, row) if row["result"] is not None else None
            call_columns = tuple(step.new_calls[0])
            for row in step.new_calls:  # every row has the same keys (as for executemany)
                params.extend([row[c] for c in call_columns])
        update_shapes: list[tuple[str, ...]] = []
        for columns, rows in self._call_update_groups(execution_id, step.call_updates):
            for row in rows:
                update_shapes.append(columns)
                params.extend([row[c] for c in columns])
                params.extend((execution_id, row["call_id"]))
        attempt_columns: tuple[str, ...] = ()
        if step.attempts:
            attempt_columns = tuple(step.attempts[0])
            for row in step.attempts:
                params.extend([row[c] for c in attempt_columns])
        if step.lost_attempts:
            params.append(list(step.lost_attempts))
        checkpoint_columns: tuple[str, ...] = ()
        if step.checkpoint is not None:
            row = {"execution_id": execution_id, **self._checkpoint_row(execution_id, step.checkpoint, now)}
            checkpoint_columns = tuple(row)
            params.extend(row.values())
        sql = _step_sql(
            exec_columns,
            call_columns,
            len(step.new_calls),
            tuple(update_shapes),
            attempt_columns,
            len(step.attempts),
            bool(step.lost_attempts),
            checkpoint_columns,
        )
        raw = conn.connection.driver_connection
        lost = False
        raw.autocommit = True  # one statement: its own transaction, no BEGIN or COMMIT to wait for
        try:
            raw.execute(sql, params)
        except psycopg.errors.DivisionByZero:  # the fence: the statement wrote nothing
            lost = True
        finally:
            _end_autocommit(raw)
        if lost:
            raise LeaseLost(f"execution {execution_id} is now driven by another process")

    def _write_step(self, conn: Any, execution_id: str, owner: str, lease_ttl: float, step: Step, now: float) -> None:
        values = {**step.execution, "lease_expires_at": now + lease_ttl, "updated_at": now}
        if "lease_owner" in values:  # the final step releases the lease
            values.update(lease_owner=None, lease_expires_at=None)
        fenced = _run(
            conn,
            _update_statement("dm_executions", ("id", "lease_owner"), tuple(sorted(values))),
            [{"k_id": execution_id, "k_lease_owner": owner, **{f"v_{k}": v for k, v in values.items()}}],
        )
        if fenced != 1:
            conn.rollback()
            raise LeaseLost(f"execution {execution_id} is now driven by another process")
        if step.blobs:
            self._insert_blobs(conn, step.blobs, now)
        if step.functions:
            self._insert_functions(conn, step.functions, now)
        if step.new_calls:
            for row in step.new_calls:  # executemany needs the same keys in every row
                row["created_at"] = now
                row["result_sig"] = self.sign_call(execution_id, row) if row["result"] is not None else None
            _run(conn, _insert_statement("dm_calls", tuple(sorted(step.new_calls[0]))), step.new_calls)
        if step.call_updates:
            self._update_calls(conn, execution_id, step.call_updates)
        if step.attempts:
            _run(conn, _insert_statement("dm_attempts", tuple(sorted(step.attempts[0]))), step.attempts)
        if step.lost_attempts:  # an outcome that is there already stays: the attempt ran
            _run(conn, _LOST_ATTEMPT, [{"k_attempt_id": a} for a in step.lost_attempts])
        if step.consumed_signals:  # with the results of the waits that took them: exactly once
            mailbox.consume(conn, execution_id, step.consumed_signals, now)
        if step.checkpoint is not None:
            row = self._checkpoint_row(execution_id, step.checkpoint, now)
            changed = _run(
                conn,
                _update_statement("dm_checkpoints", ("execution_id",), tuple(sorted(row))),
                [{"k_execution_id": execution_id, **{f"v_{k}": v for k, v in row.items()}}],
            )
            if not changed:
                row["execution_id"] = execution_id
                _run(conn, _insert_statement("dm_checkpoints", tuple(sorted(row))), [row])

    def _checkpoint_row(self, execution_id: str, checkpoint: bytes, now: float) -> dict[str, Any]:
        """The columns of a step's checkpoint (its sequence number taken), signed."""
        seq = self.checkpoint_seq.get(execution_id, 0) + 1
        self.checkpoint_seq[execution_id] = seq
        data, compression = checkpoint, "none"
        if len(data) > COMPRESS_ABOVE:
            data, compression = zlib.compress(data, 1), "zlib"
        import pydantic_monty

        return {
            "seq": seq,
            "data": data,
            "compression": compression,
            "created_at": now,
            "signature": self.signer.sign(f"checkpoint:{execution_id}:{seq}", data),
            "monty_version": pydantic_monty.__version__,
        }

    def sign_call(self, execution_id: str, row: dict[str, Any]) -> str:
        fields = (
            row.get("status"),
            row.get("result"),
            row.get("error"),
            row.get("error_type"),
            row.get("error_message"),
        )
        return self.signer.sign_text(f"call:{execution_id}:{row['call_id']}", _signed_text(fields))[:CALL_TAG]

    def verify_call(self, execution_id: str, row: Any) -> None:
        fields = (row.status, row.result, row.error, row.error_type, row.error_message)
        self.verify_call_fields(execution_id, row.call_id, row.function, fields, row.result_sig)

    def verify_call_fields(
        self, execution_id: str, call_id: int, function: str, fields: tuple[Any, ...], signature: str | None
    ) -> None:
        self.signer.verify_text(
            f"call:{execution_id}:{call_id}",
            _signed_text(fields),
            signature,
            f"the stored result of call {call_id} ({function}) of execution {execution_id}",
            short=True,
        )

    def _update_calls(self, conn: Any, execution_id: str, updates: list[dict[str, Any]]) -> None:
        for columns, rows in self._call_update_groups(execution_id, updates):
            if self.backend == "sqlite" and len(rows) > 1 and _UPDATE_FROM:
                _update_from_values(conn, execution_id, columns, rows)
                continue
            _run(
                conn,
                _update_statement("dm_calls", ("execution_id", "call_id"), columns),
                _update_params(execution_id, columns, rows),
            )

    def _call_update_groups(
        self, execution_id: str, updates: list[dict[str, Any]]
    ) -> Iterable[tuple[tuple[str, ...], list[dict[str, Any]]]]:
        """The call updates (finished ones signed) by the columns they set."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in updates:
            if row.get("status") in ("done", "failed"):
                row["result_sig"] = self.sign_call(execution_id, row)
            groups.setdefault(tuple(row), []).append(row)  # rows built alike share their key order
        for shape, rows in groups.items():
            yield tuple(sorted(k for k in shape if k != "call_id")), rows

    def _insert_functions(self, conn: Any, functions: dict[str, tuple[str, str, bytes]], now: float) -> None:
        existing = set(conn.execute(_EXISTING_FUNCTIONS, {"keys": list(functions)}).scalars())
        if existing:
            existing = _reuse_existing(conn, FUNCTIONS, existing, now, self.backend)
        rows = [
            {
                "key": key,
                "name": name[:255],
                "fingerprint": fingerprint,
                "data": data,
                "signature": self.signer.sign(f"function:{key}", data),
                "created_at": now,
            }
            for key, (name, fingerprint, data) in functions.items()
            if key not in existing
        ]
        if rows:
            _run(conn, _insert_statement("dm_functions", tuple(sorted(rows[0]))), rows)

    # -- what workers write and read --------------------------------------------------------

    @_retried
    def finish_attempts(self, records: Sequence[AttemptRecord], blobs: dict[str, tuple[bytes | BlobData, str]]) -> None:
        """Write the signed outcomes of attempts (and the blobs their results refer to) in one transaction."""
        now = time.time()
        with self.engine.begin() as conn:
            if blobs:
                self._insert_blobs(conn, blobs, now)
            for record in records:
                values = record.to_dict()
                changed = _run(
                    conn,
                    _update_statement("dm_attempts", ("attempt_id",), _OUTCOME_COLUMNS),
                    [{"k_attempt_id": record.attempt_id, **{f"v_{c}": values[c] for c in _OUTCOME_COLUMNS}}],
                )
                if not changed:  # journaled by nobody (a store reset under a running worker): keep it anyway
                    row = {**values, "created_at": now}
                    _run(conn, _insert_statement("dm_attempts", tuple(sorted(row))), [row])

    @_retried
    def load_attempts(self, attempt_ids: Sequence[str]) -> dict[str, AttemptRecord]:
        """The attempts with these ids, by id; finished ones verified (TamperedDataError otherwise)."""
        found: dict[str, AttemptRecord] = {}
        with self._reader.connect() as conn:
            for chunk in _chunks(list(attempt_ids), IN_CHUNK):
                rows = conn.execute(_ATTEMPTS_BY_ID, {"ids": list(chunk)}).all()
                for row in rows:
                    record = AttemptRecord(**row._asdict())
                    if record.finished:
                        record.verify(self.signer)
                    found[record.attempt_id] = record
        return found

    @_retried
    def load_attempt(self, attempt_id: str) -> AttemptRecord | None:
        """One attempt by id, verified if finished: what a worker reads before each run, so
        straight to the DBAPI cursor of a pooled connection with SQL compiled once (82 -> 18 µs
        on SQLite, against :meth:`load_attempts` for one id)."""
        sql, pick = _compiled(_ATTEMPT_BY_ID, self._reader.dialect)
        params = {"attempt_id": attempt_id}
        raw = self._reader.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.execute(sql, pick(params) if pick is not None else params)
                row = cursor.fetchone()
            finally:
                cursor.close()
        except BaseException:
            raw.invalidate()  # a retry (transient.py) starts on a fresh connection
            raise
        finally:
            raw.close()  # back to the pool, its transaction (on a server database) rolled back
        if row is None:
            return None
        record = AttemptRecord(**dict(zip(ATTEMPT_FIELDS, row, strict=True)))
        if record.finished:
            record.verify(self.signer)
        return record

    def prepare_for_workers(self) -> None:
        """Compile, once in this process, what a worker's attempt runs (its reads and its
        ``finish_attempts``), so processes forked from this one (RQ's work horses) start warm."""
        dialect = self.engine.dialect
        _compiled(_update_statement("dm_attempts", ("attempt_id",), _OUTCOME_COLUMNS), dialect)
        _compiled(_insert_statement("dm_attempts", tuple(sorted((*ATTEMPT_FIELDS, "created_at")))), dialect)
        self.load_attempt("warm-up")
        for read in (self.load_function, self.load_blob):
            with contextlib.suppress(KeyError):
                read("warm-up")

    def after_fork(self) -> None:
        """In a forked child: drop the parent's pooled connections (without closing them)."""
        self._writers = threading.local()
        self.engine.dispose(close=False)
        if self._reader is not self.engine:
            self._reader.dispose(close=False)
        self.pid = os.getpid()

    def load_function(self, key: str) -> bytes:
        """The verified pickle of a shipped function (KeyError if the store has none)."""
        return self._load_signed_content(
            FUNCTIONS, "function", key, lambda row: f"the function {row.name!r} shipped to workers (key {key})"
        )

    def _insert_blobs(self, conn: Any, blobs: dict[str, tuple[bytes | BlobData, str]], now: float) -> None:
        keys = list(blobs)
        existing: set[str] = set()
        for chunk in _chunks(keys, IN_CHUNK):
            existing.update(conn.execute(_EXISTING_BLOBS, {"keys": list(chunk)}).scalars())
        if existing:
            existing = _reuse_existing(conn, BLOBS, existing, now, self.backend)
        new = [k for k in keys if k not in existing]
        big = {k: blobs[k][0] for k in keys if type(blobs[k][0]) is BlobData}
        if big and self.blob_dir is not None:
            # new ones, and stored ones whose file went missing (a database copied without its folder)
            big = {k: data for k, data in big.items() if k not in existing or not self.blob_path(k).exists()}
            if big:
                self._write_blob_files(big)  # under this transaction's write lock (BEGIN IMMEDIATE)
        rows = []
        for k in new:
            data, type_name = blobs[k]
            if type(data) is BlobData and self.blob_dir is not None:  # the row signs the file's digest
                row_data, signature = b"", self.signer.sign(f"{FILE_BLOB}:{k}", data.digest.encode())
            else:
                if type(data) is BlobData:  # a server database: the pickle goes into the row
                    data = b"".join(data.verified_pieces())
                row_data, signature = data, self.signer.sign(f"blob:{k}", data)
            rows.append(
                {
                    "key": k,
                    "type_name": type_name[:255],
                    "size": len(data),
                    "data": row_data,
                    "signature": signature,
                    "created_at": now,
                }
            )
        if rows:
            _run(conn, _insert_statement("dm_blobs", tuple(sorted(rows[0]))), rows)

    def blob_path(self, key: str) -> Path:
        assert self.blob_dir is not None
        return self.blob_dir / key

    def _write_blob_files(self, blobs: dict[str, BlobData]) -> None:
        """Write big blobs as files ``<database>-blobs/<key>``, streamed from their pieces.

        Each is written to a temporary name, fsync'ed (at full durability), renamed to its key and
        the folder fsync'ed, before the transaction that inserts their rows commits: a committed
        row always finds its file. The file is written once (not into the WAL and then the
        database), and never joined in memory. Called under the store's write lock, which a prune
        holds too when it removes files (retention.py), so a file is never removed under a writer.
        """
        assert self.blob_dir is not None
        self.blob_dir.mkdir(exist_ok=True)
        sync = self.durability == "full"
        for key, data in blobs.items():
            temporary = self.blob_dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                with open(temporary, "wb") as handle:
                    for piece in data.verified_pieces():
                        handle.write(piece)
                    handle.flush()
                    if sync:
                        os.fsync(handle.fileno())
                os.replace(temporary, self.blob_path(key))
            except BaseException:
                with contextlib.suppress(OSError):
                    temporary.unlink()
                raise
        if sync and os.name == "posix":  # the new names too (Windows cannot open a folder to sync it)
            fd = os.open(self.blob_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- retention (see retention.py) ---------------------------------------------------------

    def forget(self, name_or_id: str, *, force: bool = False, vacuum: bool = False) -> Any:
        """Remove a workflow (all executions of a key) or one execution, with everything only they use."""
        from .retention import forget

        return forget(self, name_or_id, force=force, vacuum=vacuum)

    def prune(
        self,
        *,
        older_than: float | str | None = None,
        keep_latest: int = 1,
        dry_run: bool = False,
        vacuum: bool = False,
    ) -> Any:
        """Remove completed executions beyond the latest ``keep_latest`` of each key (see retention.prune)."""
        from .retention import prune

        return prune(self, older_than=older_than, keep_latest=keep_latest, dry_run=dry_run, vacuum=vacuum)

    def sizes(self) -> Any:
        """The store's size and, per workflow, its executions and the bytes they take."""
        from .retention import sizes

        return sizes(self)

    # -- agent units (durable_monty_nb.agents) ------------------------------------------

    @_retried
    def record_agent_unit(
        self,
        execution_id: str,
        call_id: int,
        attempt: int,
        unit_key: str,
        *,
        run_id: str,
        name: str,
        kind: str,
        result: str,
    ) -> str:
        """Journal one completed unit of an agent run in a call, signed; returns the stored result.

        The first record of a unit wins: when another attempt recorded it already (an abandoned
        attempt that finished after all), its result is returned, so both go on alike.
        """
        row = {
            "execution_id": execution_id,
            "call_id": call_id,
            "unit_key": unit_key,
            "attempt": attempt,
            "run_id": run_id[:255],
            "name": name[:255],
            "kind": kind,
            "result": result,
            "signature": self._sign_agent_unit(execution_id, call_id, unit_key, name[:255], result),
            "created_at": time.time(),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(AGENT_UNITS).values(row))
        except IntegrityError:
            found = self.load_agent_units(execution_id, call_id).get(unit_key)
            if found is None:
                raise
            return found.result
        return result

    @_retried
    def load_agent_units(self, execution_id: str, call_id: int) -> dict[str, Row]:
        """The completed agent units of a call, by unit key, verified (TamperedDataError otherwise)."""
        with self._reader.connect() as conn:
            rows = conn.execute(
                select(AGENT_UNITS)
                .where(AGENT_UNITS.c.execution_id == execution_id, AGENT_UNITS.c.call_id == call_id)
                .order_by(AGENT_UNITS.c.created_at)
            ).all()
        for row in rows:
            self.signer.verify_text(
                f"agent-unit:{execution_id}:{call_id}:{row.unit_key}",
                f"{row.name}\0{row.result}",
                row.signature,
                f"the stored agent unit {row.name!r} of call {call_id} of execution {execution_id}",
            )
        return {row.unit_key: row for row in rows}

    def _sign_agent_unit(self, execution_id: str, call_id: int, unit_key: str, name: str, result: str) -> str:
        return self.signer.sign_text(f"agent-unit:{execution_id}:{call_id}:{unit_key}", f"{name}\0{result}")

    # -- reading back -------------------------------------------------------------------

    @_retried
    def load_checkpoint(self, execution_id: str) -> bytes | None:
        with self._reader.connect() as conn:
            row = conn.execute(select(CHECKPOINTS).where(CHECKPOINTS.c.execution_id == execution_id)).first()
        if row is None:
            return None
        self.signer.verify(
            f"checkpoint:{execution_id}:{row.seq}",
            row.data,
            row.signature,
            f"the checkpoint of execution {execution_id}",
        )
        self.checkpoint_seq[execution_id] = row.seq
        data = zlib.decompress(row.data) if row.compression == "zlib" else row.data
        import pydantic_monty

        if row.monty_version != pydantic_monty.__version__ and not _loadable(row.monty_version):
            raise StoreError(
                f"the checkpoint of execution {execution_id} was written by pydantic-monty "
                f"{row.monty_version}, which this pydantic-monty {pydantic_monty.__version__} cannot load"
            )
        return data

    @_retried
    def load_calls(self, execution_id: str) -> list[Row]:
        """The calls of an execution, in call order, with the columns of ``CALL_FIELDS`` in that order."""
        with self._reader.connect() as conn:
            query = select(*[CALLS.c[name] for name in CALL_FIELDS]).where(CALLS.c.execution_id == execution_id)
            return list(conn.execute(query.order_by(CALLS.c.call_id)).all())

    @_retried
    def reusable_results(self, key: str, call_keys: Iterable[str]) -> dict[str, Row]:
        """Completed calls of earlier executions of ``key``, by call key (verified)."""
        found: dict[str, Row] = {}
        wanted = list(dict.fromkeys(call_keys))
        with self._reader.connect() as conn:
            # The executions of the key (those a prune or forget is removing excepted), then the
            # calls by call key (its index): a call of another key with the same call key is skipped.
            executions = set(
                conn.execute(
                    select(EXECUTIONS.c.id).where(EXECUTIONS.c.key == key, EXECUTIONS.c.status != DELETING)
                ).scalars()
            )
            for chunk in _chunks(wanted, IN_CHUNK):
                rows = conn.execute(
                    select(
                        CALLS.c.execution_id,
                        CALLS.c.call_id,
                        CALLS.c.call_key,
                        CALLS.c.status,
                        CALLS.c.result,
                        CALLS.c.error,
                        CALLS.c.error_type,
                        CALLS.c.error_message,
                        CALLS.c.result_sig,
                        CALLS.c.function,
                    ).where(CALLS.c.call_key.in_(chunk), CALLS.c.status == "done")
                ).all()
                for row in rows:
                    if row.call_key not in found and row.execution_id in executions:
                        try:
                            self.verify_call(row.execution_id, row)
                        except TamperedDataError:
                            continue  # a tampered row is never served; the call runs instead
                        found[row.call_key] = row
        return found

    def load_blob(self, key: str) -> bytes:
        """The verified pickle bytes of a stored value (KeyError if the store has none)."""
        return self._load_signed_content(BLOBS, "blob", key, lambda row: f"the stored value {key} ({row.type_name})")

    @_retried
    def _load_signed_content(self, table: Any, context: str, key: str, describe: Any) -> bytes:
        """The data of a content-addressed row, verified against its signature and its key."""
        with self._reader.connect() as conn:
            row = conn.execute(select(table).where(table.c.key == key)).first()
        if row is None:
            raise KeyError(key)
        what = describe(row)
        if table is BLOBS and row.size and not row.data and self.blob_dir is not None:
            return self._read_blob_file(key, row.signature, what)
        self.signer.verify(f"{context}:{key}", row.data, row.signature, what)
        if not content_matches(row.data, key):
            raise TamperedDataError(f"{what} does not match its content hash and was not loaded")
        return row.data

    def _read_blob_file(self, key: str, signature: str, what: str) -> bytes:
        """The verified bytes of a blob kept as a file: its BLAKE3 is its key's and its row signs it."""
        try:
            data = self.blob_path(key).read_bytes()
        except FileNotFoundError:
            raise TamperedDataError(
                f"{what} was not loaded: its file {self.blob_path(key)} is missing (the folder beside the "
                f"database holds the store's big values and must be kept with it)"
            ) from None
        digest = big_blob_digest((data,))
        self.signer.verify(f"{FILE_BLOB}:{key}", digest.encode(), signature, what)
        if digest[:32] != key:
            raise TamperedDataError(f"{what} does not match its content hash and was not loaded")
        return data

    def verify_execution_result(self, row: Any) -> None:
        self.signer.verify_text(
            f"result:{row.id}",
            f"{row.result or ''}\0{row.outputs or ''}",
            row.result_sig,
            f"the stored result of execution {row.id}",
        )

    def sign_execution_result(self, execution_id: str, result: str | None, outputs: str | None) -> str:
        return self.signer.sign_text(f"result:{execution_id}", f"{result or ''}\0{outputs or ''}")


TABLES = {
    table.name: table for table in (EXECUTIONS, CALLS, CHECKPOINTS, BLOBS, KEYS, ATTEMPTS, FUNCTIONS, AGENT_UNITS)
}
_EXISTING_BLOBS = select(BLOBS.c.key).where(BLOBS.c.key.in_(bindparam("keys", expanding=True)))
_EXISTING_FUNCTIONS = select(FUNCTIONS.c.key).where(FUNCTIONS.c.key.in_(bindparam("keys", expanding=True)))
# Built once (building a statement costs more than running it): the attempts with the ids
# ``ids``, and the one a worker reads before each run.
_ATTEMPT_COLUMNS = [ATTEMPTS.c[f] for f in ATTEMPT_FIELDS]
_ATTEMPTS_BY_ID = select(*_ATTEMPT_COLUMNS).where(ATTEMPTS.c.attempt_id.in_(bindparam("ids", expanding=True)))
_ATTEMPT_BY_ID = select(*_ATTEMPT_COLUMNS).where(ATTEMPTS.c.attempt_id == bindparam("attempt_id"))
# What an outcome sets on its attempt's row (finish_attempts).
_OUTCOME_COLUMNS = tuple(f for f in ATTEMPT_FIELDS if f not in ("attempt_id", "execution_id", "call_id", "attempt"))


def _reuse_existing(conn: Any, table: Any, keys: set[str], now: float, backend: str) -> set[str]:
    """Of content-addressed rows found existing, those still there once refreshed.

    Refreshing ``created_at`` tells a concurrent prune (which only collects rows older than its
    start) that a writer counts on the row; the locking re-read then sees a row such a prune
    deleted meanwhile as gone, so the writer inserts it again.
    """
    found: set[str] = set()
    for chunk in _chunks(sorted(keys), IN_CHUNK):
        conn.execute(update(table).where(table.c.key.in_(chunk)).values(created_at=now))
        query = select(table.c.key).where(table.c.key.in_(chunk))
        if backend != "sqlite":
            query = query.with_for_update(read=True)
        found.update(conn.execute(query).scalars())
    return found


@functools.cache
def _update_statement(table_name: str, keys: tuple[str, ...], columns: tuple[str, ...]) -> Any:
    """A prepared UPDATE (built once: building statements costs more than running them)."""
    table = TABLES[table_name]
    return (
        update(table)
        .where(*[table.c[k] == bindparam(f"k_{k}") for k in keys])
        .values({c: bindparam(f"v_{c}") for c in columns})
    )


# Marks an attempt lost (withdrawn, or gone with its worker) unless its outcome is in (literals,
# not parameters: `_run` binds only the rows' own).
_LOST_ATTEMPT = (
    update(ATTEMPTS)
    .where(
        ATTEMPTS.c.attempt_id == bindparam("k_attempt_id"),
        ATTEMPTS.c.status.notin_([literal_column(f"'{status}'") for status in FINISHED]),
    )
    .values(status=literal_column("'lost'"))
)


@functools.cache
def _insert_statement(table_name: str, columns: tuple[str, ...]) -> Any:
    table = TABLES[table_name]
    return insert(table).values({c: bindparam(c) for c in columns})


_COMPILED: dict[tuple[int, str], tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]] | None]] = {}


def _compiled(statement: Any, dialect: Any) -> tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]] | None]:
    """The SQL of a prepared statement for a dialect, compiled once, and for positional
    paramstyles a function that picks a row's parameters in their order."""
    key = (id(statement), dialect.name)
    compiled = _COMPILED.get(key)
    if compiled is None:
        result = statement.compile(dialect=dialect)
        order = result.positiontup
        pick = None
        if order is not None:
            pick = operator.itemgetter(*order) if len(order) > 1 else (lambda row, name=order[0]: (row[name],))
        compiled = _COMPILED[key] = (result.string, pick)
    return compiled


def _run(conn: Any, statement: Any, rows: list[dict[str, Any]]) -> int:
    """Execute a prepared statement for ``rows`` on the connection's DBAPI cursor.

    The hot path of the driver's commits: SQL is compiled once per dialect, and rows go to the
    driver's ``executemany`` without SQLAlchemy's per-row processing (all values here are
    plain str, int, float, bytes or None). Returns the number of rows matched.
    """
    sql, pick = _compiled(statement, conn.dialect)
    params: list[Any] = list(map(pick, rows)) if pick is not None else rows
    cursor = conn.connection.cursor()
    try:
        if len(params) == 1:
            cursor.execute(sql, params[0])
        else:
            cursor.executemany(sql, params)
        return cursor.rowcount
    finally:
        cursor.close()


_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33)  # UPDATE ... FROM
# Rows per statement: SQLite prepares a statement of 1,000 rows in about 3 ms the first time a
# connection runs it (a first cell's 1,000 results), one of 100 in 0.3 ms; beyond 100 rows a
# statement saves nothing more per row.
_VALUES_ROWS = 100


@functools.lru_cache(maxsize=16)  # full chunks, and the last one of recent commits
def _update_from_sql(columns: tuple[str, ...], count: int) -> str:
    sets = ", ".join(f"{c} = v.column{i + 2}" for i, c in enumerate(columns))
    row = "(" + ", ".join("?" * (len(columns) + 1)) + ")"
    return (
        f"UPDATE dm_calls SET {sets} FROM (VALUES {', '.join([row] * count)}) AS v "
        "WHERE dm_calls.execution_id = ? AND dm_calls.call_id = v.column1"
    )


def _update_from_values(conn: Any, execution_id: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """Update call rows on SQLite with one statement per thousand rows. ``executemany`` runs one
    statement per row, and sqlite3 gives up the GIL for each: with the executor's threads busy,
    taking it back again cost more than the update itself (5,000 results of a gather: 1.3 to 3.5 s
    against 0.3 to 0.5 s under load)."""
    pick = operator.itemgetter("call_id", *columns)
    cursor = conn.connection.cursor()
    try:
        for start in range(0, len(rows), _VALUES_ROWS):
            part = rows[start : start + _VALUES_ROWS]
            params: list[Any] = []
            for row in part:
                params.extend(pick(row))
            params.append(execution_id)
            cursor.execute(_update_from_sql(columns, len(part)), params)
    finally:
        cursor.close()


def _update_params(execution_id: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = [(c, f"v_{c}") for c in columns]
    params = []
    for r in rows:
        param = {bind: r[c] for c, bind in names}
        param["k_execution_id"] = execution_id
        param["k_call_id"] = r["call_id"]
        params.append(param)
    return params


ONE_STATEMENT_ROWS = 64
"""Rows (new calls, results, attempts) up to which a PostgreSQL step is one statement; bigger
steps take one ``executemany`` per table (psycopg sends those in a pipeline)."""


def _writes_only(step: Step) -> bool:
    """Whether a step only writes: no new blobs or functions (it reads which are stored already)
    and no consumed deliveries (it reads the mailbox), all of which go through SQLAlchemy."""
    return not (step.blobs or step.functions or step.consumed_signals)


def _one_statement_fits(step: Step) -> bool:
    """Whether a step can be one statement: it only writes (:func:`_writes_only`), it is small,
    and no call row is written twice (statements of one ``WITH`` do not see each other's rows)."""
    if not _writes_only(step):
        return False
    if len(step.new_calls) + len(step.call_updates) + len(step.attempts) + len(step.lost_attempts) > ONE_STATEMENT_ROWS:
        return False
    if step.call_updates:
        updated = {row["call_id"] for row in step.call_updates}
        if len(updated) != len(step.call_updates) or any(row["call_id"] in updated for row in step.new_calls):
            return False
    return True


_CASTS = {
    "VARCHAR": "VARCHAR",
    "TEXT": "TEXT",
    "INTEGER": "INTEGER",
    "DOUBLE PRECISION": "DOUBLE PRECISION",
    "BYTEA": "BYTEA",
}


def _casts(table: Any, columns: tuple[str, ...]) -> str:
    """``(%s::TYPE, ...)``, one typed parameter per column (a NULL would otherwise be text)."""
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    types = [_CASTS[table.c[c].type.compile(dialect=dialect).split("(")[0]] for c in columns]
    return "(" + ", ".join(f"%s::{t}" for t in types) + ")"


@functools.lru_cache(maxsize=256)
def _step_sql(
    exec_columns: tuple[str, ...],
    call_columns: tuple[str, ...],
    calls: int,
    update_shapes: tuple[tuple[str, ...], ...],
    attempt_columns: tuple[str, ...],
    attempts: int,
    lost_attempts: bool,
    checkpoint_columns: tuple[str, ...],
) -> str:
    """PostgreSQL: the one statement of a step of this shape (parameters in the order
    :meth:`Store._step_statement` lists them). Column names are the store's own."""
    fenced = "EXISTS (SELECT FROM fenced)"
    sets = ", ".join(f'"{c}" = %s' for c in exec_columns)
    parts = [f"fenced AS (UPDATE dm_executions SET {sets} WHERE id = %s AND lease_owner = %s RETURNING 1)"]
    if calls:
        names = ", ".join(f'"{c}"' for c in call_columns)
        rows = ", ".join([_casts(CALLS, call_columns)] * calls)
        parts.append(f"new_calls AS (INSERT INTO dm_calls ({names}) SELECT * FROM (VALUES {rows}) AS v WHERE {fenced})")
    for i, columns in enumerate(update_shapes):
        sets = ", ".join(f'"{c}" = %s' for c in columns)
        parts.append(f"call_{i} AS (UPDATE dm_calls SET {sets} WHERE execution_id = %s AND call_id = %s AND {fenced})")
    if attempts:
        names = ", ".join(f'"{c}"' for c in attempt_columns)
        rows = ", ".join([_casts(ATTEMPTS, attempt_columns)] * attempts)
        parts.append(
            f"attempts AS (INSERT INTO dm_attempts ({names}) SELECT * FROM (VALUES {rows}) AS v WHERE {fenced})"
        )
    if lost_attempts:
        parts.append(
            "lost AS (UPDATE dm_attempts SET status = 'lost' WHERE attempt_id = ANY(%s) "
            f"AND status NOT IN ('done', 'failed') AND {fenced})"
        )
    if checkpoint_columns:
        names = ", ".join(f'"{c}"' for c in checkpoint_columns)
        sets = ", ".join(f'"{c}" = excluded."{c}"' for c in checkpoint_columns if c != "execution_id")
        parts.append(
            f"checkpoint AS (INSERT INTO dm_checkpoints ({names}) SELECT * FROM (VALUES "
            f"{_casts(CHECKPOINTS, checkpoint_columns)}) AS v WHERE {fenced} "
            f"ON CONFLICT (execution_id) DO UPDATE SET {sets})"
        )
    return "WITH " + ", ".join(parts) + " SELECT 1 / count(*) FROM fenced"


def _end_autocommit(raw: Any) -> None:
    """Give a psycopg connection back its transactions after a one-statement step (autocommit
    off; an open transaction, which a one-statement step never leaves, rolled back). One that
    cannot be restored is closed, so the pool never hands it out again."""
    import psycopg

    if raw.closed:
        return
    try:
        if raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raw.rollback()
        raw.autocommit = False
    except Exception:
        raw.close()


def _signed_text(fields: tuple[Any, ...]) -> str:
    status, result, error, error_type, message = fields
    return f"{status}\0{result or ''}\0{error or ''}\0{error_type or ''}\0{message or ''}"


def _loadable(version: str) -> bool:
    """Monty 1.4 loads dumps of 1.3 and 1.4."""
    return version.startswith(("1.3.", "1.4."))


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
