"""Shared fixtures: stores on every backend, a signing key, and service checks.

PostgreSQL and MariaDB URLs come from DURABLE_TEST_POSTGRES_URL and DURABLE_TEST_MYSQL_URL
(defaults: the servers of the development machine). Each test session works in a database
of its own on each server, dropped at the end. In CI (CI=true) an unreachable server fails
the tests that need it instead of skipping them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from durable_monty_nb.store.schema import HEAD_REVISION, VERSION_TABLE

# Every process of the test session (kernels and subprocesses too) signs with this key and
# uses a fresh default store, never one left in the repository by a manual run.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="durable-tests-"))
os.environ.setdefault("DURABLE_MONTY_KEY", "test-key-" + uuid.uuid4().hex)
os.environ["DURABLE_MONTY_DB"] = f"sqlite:///{_SESSION_DIR / 'notebooks.db'}"

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

SERVER_URLS = {
    "postgresql": os.environ.get("DURABLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": os.environ.get("DURABLE_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
from ci import IN_CI, REDIS_URL, missing, require_module, unavailable  # noqa: E402  (one decision for the suite)

__all__ = ["IN_CI", "missing", "require_module", "unavailable"]


class ServerDatabase:
    """A database of this test session on a server, with a cheap reset between tests."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.name = f"dm_test_{uuid.uuid4().hex[:10]}"
        self.url = make_url(base_url).set(database=self.name).render_as_string(hide_password=False)
        admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {self.name}"))
        admin.dispose()
        self.engine = sa.create_engine(self.url)

    def reset(self) -> None:
        inspector = sa.inspect(self.engine)
        tables = set(inspector.get_table_names())
        with self.engine.begin() as conn:
            for table in (
                "dm_handoffs",
                "dm_agent_units",
                "dm_signals",
                "dm_attempts",
                "dm_functions",
                "dm_checkpoints",
                "dm_calls",
                "dm_blobs",
                "dm_keys",
                "dm_executions",
            ):
                if table in tables:
                    conn.execute(sa.text(f"DELETE FROM {table}"))
            if VERSION_TABLE in tables:  # a test may have changed the schema version
                conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = :v"), {"v": HEAD_REVISION})

    def drop(self) -> None:
        self.engine.dispose()
        admin = sa.create_engine(self.base_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            if admin.dialect.name == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name}"))
        admin.dispose()


_servers: dict[str, ServerDatabase | Exception] = {}


def server_database(backend: str) -> ServerDatabase:
    if backend not in _servers:
        try:
            _servers[backend] = ServerDatabase(SERVER_URLS[backend])
        except Exception as exc:  # remembered, so every test reports it
            _servers[backend] = exc
    found = _servers[backend]
    if isinstance(found, Exception):
        unavailable(f"{backend} ({SERVER_URLS[backend]})", found)
    return found  # type: ignore[return-value]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for found in _servers.values():
        if isinstance(found, ServerDatabase):
            found.drop()
    shared_lab = sys.modules.get("shared_lab")
    if shared_lab is not None:  # an interrupted session's browser and JupyterLab
        shared_lab.close_shared()


BACKENDS = ["sqlite", "postgresql", "mysql"]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    database = server_database(request.param)
    database.reset()
    yield database.url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


def _engine(url: str) -> Iterator[object]:
    """An engine on ``url``; whatever it still runs at the end of the test is interrupted."""
    from durable_monty_nb import Engine

    eng = Engine(url)
    yield eng
    for run in eng.active_runs():
        run.cancel()
        run.wait(30)
    eng.close()


@pytest.fixture
def engine(db_url: str) -> Iterator[object]:
    """An engine on a fresh store of each backend."""
    yield from _engine(db_url)


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[object]:
    """An engine on a fresh SQLite file (for behaviour that does not depend on the backend)."""
    yield from _engine(sqlite_url)


@pytest.fixture
def redis_url() -> str:
    """The tests' own Redis database (number 11 unless DURABLE_TEST_REDIS_URL says otherwise), flushed."""
    from redis import Redis

    try:
        Redis.from_url(REDIS_URL, socket_connect_timeout=3).flushdb()
    except Exception as exc:
        unavailable(f"Redis ({REDIS_URL})", exc)
    return REDIS_URL


@pytest.fixture
def postgres_url() -> str:
    """A fresh, empty store on the PostgreSQL server."""
    database = server_database("postgresql")
    database.reset()
    return database.url


@pytest.fixture(params=["postgresql", "mysql"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerDatabase]:
    """A fresh, empty store on each database server (``.url``; ``.base_url`` for admin work)."""
    database = server_database(request.param)
    database.reset()
    yield database
    database.engine.dispose()  # a test may have killed its pooled connections


@pytest.fixture
def own_dask_cluster(tmp_path: Path) -> Iterator[Any]:
    """A `dask scheduler` and workers of this test alone (real processes), closed after it."""
    from test_dask import Cluster

    from durable_monty_nb.executors.dask import close_clients

    (tmp_path / "dask").mkdir()
    cluster = Cluster(tmp_path / "dask")
    yield cluster
    close_clients()
    cluster.close()


# The browser tests (tests/test_browser*.py) share one JupyterLab server and one Chromium
# (tests/shared_lab.py); each test has a folder of the server, its own store, a browser context.
@pytest.fixture
def lab_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fresh folder of the shared JupyterLab server; its notebooks' sessions are shut down after the test."""
    import shared_lab

    server = shared_lab.shared_server(tmp_path_factory)
    folder = server.new_folder(request.node.name)
    yield folder
    server.close_folder(folder)


@pytest.fixture
def page() -> Iterator[Any]:
    """A Chromium page, 1280x900, in a browser context of this test alone (the browser is shared)."""
    import shared_lab

    context = shared_lab.shared_browser().new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After the last browser test in a row, close the shared browser and JupyterLab server."""
    try:
        return (yield)
    finally:
        shared_lab = sys.modules.get("shared_lab")
        if shared_lab is not None and (nextitem is None or nextitem.get_closest_marker("browser") is None):
            shared_lab.close_shared()
