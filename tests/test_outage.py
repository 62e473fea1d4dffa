"""The store rides through database outages: killed connections, lost commit acknowledgements,
a server that goes away for a while, and a SQLite file locked by another process.

Every test asserts the right result and that no completed call ran twice (a side-effect log).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from procs import wait_until
from proxy import Proxy
from sqlalchemy.engine import make_url

from durable_monty_nb import Engine
from durable_monty_nb.errors import StoreError, StoreUnavailable


@pytest.fixture
def server_url(server: Any) -> str:
    return server.url


def kill_connections(url: str, admin_url: str) -> int:
    """Kill every connection to the store's database, from a connection to another database."""
    parsed = make_url(url)
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if parsed.get_backend_name() == "postgresql":
                return len(
                    conn.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": parsed.database},
                    ).all()
                )
            ids = conn.execute(
                sa.text("SELECT id FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID()"),
                {"db": parsed.database},
            ).scalars()
            killed = 0
            for connection_id in list(ids):
                try:
                    conn.execute(sa.text(f"KILL {int(connection_id)}"))
                    killed += 1
                except sa.exc.DBAPIError:  # it ended meanwhile
                    pass
            return killed
    finally:
        admin.dispose()


class SideLog:
    """What the notebook functions did, one line per call, shared with the test thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def work(self) -> Any:
        path, lock = self.path, self.lock

        def work(i):
            with lock, open(path, "a") as handle:
                handle.write(f"{i}\n")
            time.sleep(0.01)  # a little work, so kills land while calls are in flight
            return i * i

        return work

    def held_from(self, first: int, gate: threading.Event) -> Any:
        """``work``, with calls from ``first`` on held until the gate opens (they finish while the store is down)."""
        work = self.work()

        def held(i):
            if i >= first:
                gate.wait(60)  # test scaffolding: the test opens the gate
            return work(i)

        return held

    def entries(self) -> list[int]:
        with self.lock:
            return [int(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


def kill_during(url: str, admin_url: str, log: SideLog, marks: list[int], run: Any) -> list[int]:
    """Kill all the store's connections each time the log reaches a mark; returns the kill counts."""
    killed = []
    for mark in marks:
        wait_until(lambda mark=mark: len(log.entries()) >= mark or run.done, what=f"{mark} calls")
        if run.done:
            break
        killed.append(kill_connections(url, admin_url))
    return killed


@pytest.mark.parametrize("shape", ["gather", "sequential"])
def test_killed_connections_during_a_run(server: Any, server_url: str, tmp_path: Path, shape: str) -> None:
    log = SideLog(tmp_path / "side.log")
    engine = Engine(server_url)
    n = 120
    if shape == "gather":
        code = f"sum(await gather(*[work(i) for i in range({n})]))"
        run = engine.start(code, {"work": log.work()}, key="gather", workers=2)
    else:
        code = f"total = 0\nfor i in range({n}):\n    total += await work(i)\ntotal"
        run = engine.start(code, {"work": log.work()}, key="loop")
    killed = kill_during(server_url, server.base_url, log, [10, 35, 60, 85], run)
    assert run.result(120) == sum(i * i for i in range(n))
    assert sorted(log.entries()) == list(range(n))  # no call ran twice
    assert len(killed) >= 3 and sum(killed) >= 3  # connections really were killed mid-run
    assert engine.store.get_execution(run.execution_id).status == "completed"
    engine.close()


def proxied(server_url: str, **cuts: float) -> tuple[Proxy, str]:
    """A proxy in front of the server of ``server_url``, and the store URL that goes through it."""
    parsed = make_url(server_url)
    proxy = Proxy((parsed.host or "127.0.0.1", parsed.port or 5432), **cuts)
    return proxy, parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def test_commits_whose_acknowledgement_is_lost(server_url: str, tmp_path: Path) -> None:
    """The connection is cut right after COMMIT is sent (on PostgreSQL, a step sent as one
    statement outside a transaction block), and at random points of steps."""
    proxy, url = proxied(server_url, cut_after_commit=0.3, cut_anywhere=0.02)
    proxy.max_cuts = 12
    log = SideLog(tmp_path / "side.log")
    engine = Engine(url)
    try:
        n = 40
        code = f"squares = await gather(*[work(i) for i in range(20)])\nfor i in range(20, {n}):\n"
        code += "    squares.append(await work(i))\nsum(squares)"
        run = engine.start(code, {"work": log.work()}, key="acks", workers=4)
        assert run.result(120) == sum(i * i for i in range(n))
        assert sorted(log.entries()) == list(range(n))
        assert proxy.commit_cuts >= 1, "no commit acknowledgement was lost: the test proved nothing"
        if make_url(server_url).get_backend_name() == "postgresql":  # steps of one statement, outside BEGIN
            assert proxy.statement_cuts >= 1, "no one-statement step lost its acknowledgement"
    finally:
        engine.close()
        proxy.close()


def test_a_longer_outage_is_shown_then_ridden_out(server_url: str, tmp_path: Path) -> None:
    proxy, url = proxied(server_url)
    gate = threading.Event()
    log = SideLog(tmp_path / "side.log")
    held = log.held_from(5, gate)

    engine = Engine(url)
    engine.store.retry_window = 0.5
    try:
        run = engine.start("sum(await gather(*[held(i) for i in range(10)]))", {"held": held}, key="outage")
        wait_until(lambda: engine.store.get_execution(run.execution_id).calls_done == 5, what="5 committed calls")
        proxy.down()
        gate.set()
        note = wait_until(lambda: run.progress.note, what="the outage to be shown")
        assert "store unreachable since" in note and "retrying" in note
        assert not run.done
        proxy.up()
        assert run.result(120) == sum(i * i for i in range(10))
        assert sorted(log.entries()) == list(range(10))
        assert run.progress.note is None
    finally:
        engine.close()
        proxy.close()


def test_past_the_outage_limit_the_run_stops_resumable_losing_nothing_committed(
    server_url: str, tmp_path: Path
) -> None:
    proxy, url = proxied(server_url)
    gate = threading.Event()
    log = SideLog(tmp_path / "side.log")
    held = log.held_from(5, gate)

    engine = Engine(url, store_outage_limit=1.0)
    engine.store.retry_window = 0.3
    try:
        run = engine.start("sum(await gather(*[held(i) for i in range(10)]))", {"held": held}, key="limit")
        wait_until(lambda: engine.store.get_execution(run.execution_id).calls_done == 5, what="5 committed calls")
        proxy.down()
        gate.set()
        assert run.wait(60) and run.status == "interrupted"
        with pytest.raises(StoreUnavailable) as stopped:
            run.result()
        message = str(stopped.value)
        assert "is unreachable" in message and "%durable_resume limit" in message
        assert "Traceback" not in message and "[SQL:" not in message  # one line of cause, no driver dump
        proxy.up()
        assert engine.resume("limit", {"held": held}).result(120) == sum(i * i for i in range(10))
        counts = {i: log.entries().count(i) for i in range(10)}
        assert all(counts[i] == 1 for i in range(5))  # committed before the outage: never again
    finally:
        engine.close()
        proxy.close()


HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))  # the other writer holds the lock this long (the scenario, not a sync)
conn.execute("COMMIT")
"""


def test_sqlite_locked_by_another_process_beyond_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import durable_monty_nb.store.store as store_module

    monkeypatch.setattr(store_module, "SQLITE_BUSY_TIMEOUT", 0.2)
    db = tmp_path / "store.db"
    log = SideLog(tmp_path / "side.log")
    engine = Engine(f"sqlite:///{db}")
    n = 30
    code = f"total = 0\nfor i in range({n}):\n    total += await work(i)\ntotal"
    run = engine.start(code, {"work": log.work()}, key="locked")
    wait_until(lambda: len(log.entries()) >= 5, what="5 calls")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        held_at = len(log.entries())
        assert run.result(60) == sum(i * i for i in range(n))
        assert holder.wait(30) == 0
    finally:
        holder.kill()
    assert held_at < n  # the lock was taken mid-run
    assert sorted(log.entries()) == list(range(n))
    engine.close()


def test_store_errors_name_the_store_in_one_line(server: Any) -> None:
    proxy = Proxy(("127.0.0.1", 9))  # nothing listens behind it
    proxy.down()
    url = make_url(server.url).set(host="127.0.0.1", port=proxy.port, password="secret")
    try:
        with pytest.raises(StoreError) as failure:  # typed: a caller catches it without matching text
            Engine(url.render_as_string(hide_password=False))
        text = str(failure.value)
        assert f"127.0.0.1:{proxy.port}" in text and "secret" not in text
        assert len(text.splitlines()) <= 3
    finally:
        proxy.close()


def test_during_an_outage_nothing_new_is_dispatched_and_the_widget_and_status_say_so(
    server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequential cell run with %%durable: the store goes away while call 2 runs. Call 2's result
    cannot be committed, so call 3 never starts until the store is back; the widget and
    %durable_status show the outage; then the run continues."""
    from IPython.core.interactiveshell import InteractiveShell

    from durable_monty_nb.notebook.views import make_widget

    proxy, url = proxied(server_url)
    gate = threading.Event()
    log = SideLog(tmp_path / "side.log")
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "durable_monty_nb")
    magics = shell.magics_manager.registry["DurableMagics"]
    try:
        engine = magics.engine(url)
        engine.store.retry_window = 0.5
        shell.user_ns["held"] = log.held_from(2, gate)
        cell = "total = 0\nfor i in range(5):\n    total += await held(i)\ntotal"
        assert shell.run_cell(f"%%durable steps --background --quiet --db {url}\n{cell}").success
        (run,) = engine.active_runs()
        wait_until(lambda: engine.store.get_execution(run.execution_id).calls_done == 2, what="2 committed calls")
        proxy.down()
        gate.set()  # call 2 finishes while the store is away
        wait_until(lambda: 2 in log.entries(), what="call 2 to finish while the store is away")
        note = wait_until(lambda: run.progress.note, what="the outage to be shown")
        assert note.startswith("store unreachable since") and "retrying" in note
        assert not run.wait(1.0)  # a second of outage: the run neither ends nor goes on
        assert log.entries() == [0, 1, 2]  # call 3 was not dispatched
        widget = make_widget(run)
        widget.refresh()
        assert "store unreachable since" in widget._counts.value
        status = repr(shell.run_line_magic("durable_status", f"--db {url}"))
        # From the kernel's memory: call 2's result is in (3 done), call 3 announced and held back (of 4).
        assert "store unreachable since" in status and "steps" in status and "3/4" in status, status
        proxy.up()
        assert run.wait(120) and run.status == "completed"
        assert run.result() == sum(i * i for i in range(5))
        assert log.entries() == [0, 1, 2, 3, 4]  # each call once
        assert "store unreachable" not in repr(shell.run_line_magic("durable_status", f"--db {url}"))
    finally:
        gate.set()
        proxy.close()
        shell.run_line_magic("unload_ext", "durable_monty_nb")


def test_a_start_whose_commit_acknowledgement_is_lost_is_recognised(server_url: str) -> None:
    """The commit that creates an execution lands, its answer is lost with the connection: the
    retried create finds its own row and the run goes on (it answered ExecutionBusy, "another
    process started it"). For a new key and for a key with an earlier execution, a few times each."""
    proxy, url = proxied(server_url)
    engine = Engine(url)
    try:
        for i in range(4):
            for key in (f"fresh-{i}", "again"):  # no execution of the key yet / an earlier one to replace
                with proxy._lock:
                    proxy.cuts, proxy.max_cuts, proxy.cut_after_commit = 0, 1, 1.0  # the next COMMIT only
                run = engine.start(f"await f({i})", {"f": lambda x: x + 1}, key=key, rerun=True)
                assert proxy.commit_cuts >= 1 and run.result(60) == i + 1
                proxy.cut_after_commit, proxy.commit_cuts = 0.0, 0
        assert [r.key for r in engine.store.list_executions(latest_only=False)].count("again") == 4
    finally:
        engine.close()
        proxy.close()
