"""Which database errors are worth retrying, and the retry loop of store operations.

A dropped connection, a restarted server, a killed backend, a deadlock or serialization
failure, and a SQLite file locked by another writer are transient: the operation is retried
with backoff for ``STORE_RETRY_WINDOW`` seconds before ``StoreUnavailable`` is raised, naming
the store and the cause in one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError

from .. import defaults
from ..errors import StoreUnavailable

T = TypeVar("T")

# SQLSTATE classes: 08 connection exception, 40 transaction rollback (serialization failure,
# deadlock), 57 operator intervention (admin shutdown, crash shutdown, cannot connect now).
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "57")
# MySQL / MariaDB error codes: lock wait timeout, deadlock, connection killed, server gone, lost
# connection, cannot connect, server shutdown in progress, query interrupted.
TRANSIENT_MYSQL_CODES = frozenset((1040, 1053, 1205, 1213, 1317, 1927, 2002, 2003, 2006, 2013, 2055, 4031))
DRIVER_MODULES = ("psycopg", "psycopg2", "pymysql", "MySQLdb", "sqlite3")
TRANSIENT_SQLITE_MESSAGES = ("database is locked", "database is busy", "database table is locked")


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def driver_error(exc: BaseException) -> BaseException | None:
    """The database driver's exception behind ``exc`` (SQLAlchemy wraps it; the store's raw
    cursor path does not), or None when ``exc`` is not a database error."""
    if isinstance(exc, DBAPIError):
        return exc.orig or exc
    module = type(exc).__module__.split(".")[0]
    return exc if module in DRIVER_MODULES and "Error" in _names(exc) else None


def is_integrity_error(exc: BaseException) -> bool:
    orig = driver_error(exc)
    return orig is not None and ("IntegrityError" in _names(orig) or isinstance(exc, IntegrityError))


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation (on a new connection) may succeed."""
    orig = driver_error(exc)
    if orig is None:
        return False
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES:
        return True
    names = _names(orig)
    module = type(orig).__module__.split(".")[0]
    if module == "psycopg" and sqlstate is None and names & {"OperationalError", "InterfaceError"}:
        return True  # no server answer at all: a connection that failed, was closed or was lost
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in TRANSIENT_MYSQL_CODES:
        return True
    if module == "pymysql" and names & {"InterfaceError"}:
        return True  # pymysql's "(0, '')": a connection already closed
    text = str(orig).lower()
    return any(message in text for message in TRANSIENT_SQLITE_MESSAGES)


def cause(exc: BaseException) -> str:
    """The driver's message in one line, without SQLAlchemy's SQL and background link."""
    orig = driver_error(exc) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return f"{type(orig).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class Outage:
    """When a store became unreachable, for messages like "unreachable since 12:03:07"."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.since: float | None = None  # by ``now`` (the driver's clock)
        self.cause = ""
        self._now = now

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = self._now()
        self.cause = cause(exc)

    def recovered(self) -> None:
        self.since = None

    @property
    def since_text(self) -> str:
        return time.strftime("%H:%M:%S", time.localtime(self.since or time.time()))


def retrying(
    operation: Callable[[], T],
    store: str,
    *,
    window: float = defaults.STORE_RETRY_WINDOW,
    landed: Callable[[], T | None] | None = None,
) -> T:
    """Run ``operation``, retrying it through transient errors for ``window`` seconds.

    ``landed``, for writes that are not idempotent: asked after a transient error whether the
    write committed anyway (the acknowledgement of a commit can be lost with its connection);
    a result other than None ends the retries, as the operation's result.
    """
    deadline = time.monotonic() + window
    delay = 0.02
    retried = False
    while True:
        try:
            return operation()
        except Exception as exc:
            # A re-applied write that collides with itself: the earlier try did commit, and its
            # transaction may still have been finishing when ``landed`` first looked.
            collided = retried and landed is not None and is_integrity_error(exc)
            if collided and (found := _landed_soon(landed)) is not None:  # type: ignore[arg-type]
                return found
            if not is_transient(exc):
                raise
            error: BaseException = exc
        retried = True
        if landed is not None:
            try:
                found = landed()
                if found is not None:
                    return found
            except Exception as exc:
                if not is_transient(exc):
                    raise
        if time.monotonic() + delay > deadline:
            raise StoreUnavailable(f"the store {store} is unreachable: {cause(error)}") from error
        time.sleep(delay)  # backoff before the next try, not a synchronization
        delay = min(delay * 2, 1.0)


def _landed_soon(landed: Callable[[], T | None], within: float = 5.0) -> T | None:
    """Ask ``landed`` until it says yes or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while True:
        try:
            found = landed()
        except Exception as exc:  # the look itself lost its connection: look again
            if not is_transient(exc):
                raise
            found = None
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.01)  # the other transaction's commit is in progress on the server
