"""Schema versioning of a store, managed with Alembic.

A new store is created from the models and stamped with the head revision. A store stamped
with an older revision gets a clear message that tells how to upgrade it
(``durable-monty-nb upgrade --db URL``); a store from a newer release is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, text
from sqlalchemy.schema import CreateIndex, CreateTable

from ..errors import StoreVersionError
from .models import metadata

VERSION_TABLE = "dm_alembic_version"
HEAD_REVISION = "0008_handoff_progress"
MIGRATIONS = Path(__file__).with_name("migrations")


def known_revisions() -> list[str]:
    return sorted(p.stem for p in (MIGRATIONS / "versions").glob("[0-9]*.py"))


def read_revision(engine: Engine) -> str | None:
    """The store's revision, or None when the store has no durable-monty tables yet."""
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    except Exception:
        return None


def ensure_schema(engine: Engine, url: str) -> None:
    """Create the tables of a new store, or check that an existing one fits this release."""
    revision = read_revision(engine)
    if revision is None:
        try:
            _create(engine)
        except Exception:
            revision = read_revision(engine)  # another process created it at the same time
            if revision is None:
                raise
        else:
            return
    check_revision(revision, url)


def check_revision(revision: str, url: str) -> None:
    if revision == HEAD_REVISION:
        return
    if revision in known_revisions():
        raise StoreVersionError(
            f"the store {url} has schema version {revision}; this release of durable-monty-nb needs "
            f"{HEAD_REVISION}. Upgrade it with: durable-monty-nb upgrade --db '{url}'"
        )
    raise StoreVersionError(
        f"the store {url} has schema version {revision!r}, which this release of durable-monty-nb "
        f"(schema {HEAD_REVISION}) does not know: it was written by a newer release. Upgrade "
        f"durable-monty-nb, or use another store."
    )


def _create(engine: Engine) -> None:
    try:
        with engine.begin() as conn:
            for statement in _ddl(conn.dialect):
                conn.exec_driver_sql(statement)
            _stamp(conn)
    except Exception:
        if read_revision(engine) is not None:
            raise  # another process created it meanwhile (ensure_schema reads its revision)
        with engine.begin() as conn:  # some tables exist already (not ours to drop): create the rest
            metadata.create_all(conn)
            _stamp(conn)


def _stamp(conn: Connection) -> None:
    conn.execute(text(f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
    conn.execute(text(f"INSERT INTO {VERSION_TABLE} (version_num) VALUES (:v)"), {"v": HEAD_REVISION})


_DDL: dict[tuple[str, Any], list[str]] = {}


def _ddl(dialect: Dialect) -> list[str]:
    """The statements that create every table and index of a new store, compiled once per
    dialect (and server version) of the process: compiling them took about half of a new
    SQLite store's creation, which the first cell of a notebook waits for."""
    key = (dialect.name, dialect.server_version_info)
    statements = _DDL.get(key)
    if statements is None:
        statements = []
        for table in metadata.sorted_tables:
            statements.append(str(CreateTable(table).compile(dialect=dialect)).strip())
            statements.extend(str(CreateIndex(index).compile(dialect=dialect)) for index in table.indexes)
        _DDL[key] = statements
    return statements


def upgrade(url: str) -> str:
    """Bring a store to the head revision with Alembic; returns the revision reached."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return read_revision(engine) or HEAD_REVISION
