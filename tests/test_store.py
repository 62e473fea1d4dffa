"""The store: schema versions, signed rows, leases, SQLite durability settings."""

from __future__ import annotations

import itertools
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from durable_monty_nb import Engine, StoreVersionError, TamperedDataError
from durable_monty_nb.store import schema
from durable_monty_nb.store.models import metadata
from durable_monty_nb.store.signing import Signer
from durable_monty_nb.store.store import Store, _proc_stat, _process_start, new_owner, owner_is_dead, pending_call_row


def interrupted_run(engine: Engine, key: str = "tamper") -> str:
    """An execution with committed results, a checkpoint and a pickled blob, then interrupted."""
    import pandas as pd

    release = threading.Event()
    both_running = threading.Barrier(3, timeout=30)

    def frame(n: int) -> object:
        return pd.DataFrame({"n": range(n)})

    def wait(x: int) -> int:
        both_running.wait()
        release.wait(30)
        return x

    code = "df = await frame(3)\nw = await gather(wait(1), wait(2))\nlen_after = await wait(3)\n[w, len_after]"
    run = engine.start(code, {"frame": frame, "wait": wait}, key=key)
    both_running.wait()  # frame(3) is done, wait(1) and wait(2) run: wait(3) will never start
    run.cancel()
    release.set()
    run.wait(30)
    assert run.status == "interrupted"
    return run.execution_id


def resume_namespace() -> dict[str, object]:
    def frame(n: int) -> object:
        raise AssertionError("must not run again")

    def wait(x: int) -> int:
        return x

    return {"frame": frame, "wait": wait}


def test_new_store_is_stamped_with_the_head_revision(db_url: str) -> None:
    store = Store(db_url)
    assert schema.read_revision(store.engine) == schema.HEAD_REVISION


def test_a_new_store_has_the_tables_the_models_declare(db_url: str) -> None:
    """A new store's tables come from statements compiled once a process: they are the models'."""
    store = Store(db_url)
    found = sa.inspect(store.engine)
    for table in metadata.sorted_tables:
        assert {c["name"] for c in found.get_columns(table.name)} == set(table.columns.keys())
        assert {i["name"] for i in found.get_indexes(table.name)} >= {i.name for i in table.indexes}
    assert Store(db_url).latest_execution("none") is None  # opened again: the same store


def test_tables_without_a_version_are_completed_and_stamped_keeping_their_rows(sqlite_url: str) -> None:
    engine = Engine(sqlite_url)
    assert engine.run("1 + 1", {}, key="kept") == 2
    kept = engine.store.latest_execution("kept").id
    engine.close()
    with Store(sqlite_url).engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {schema.VERSION_TABLE}"))
        conn.execute(sa.text("DROP TABLE dm_signals"))
    again = Store(sqlite_url)
    assert schema.read_revision(again.engine) == schema.HEAD_REVISION
    assert again.latest_execution("kept").id == kept
    assert "dm_signals" in sa.inspect(again.engine).get_table_names()


def test_store_from_a_newer_release_is_refused_clearly(db_url: str) -> None:
    store = Store(db_url)
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0099_future'"))
    with pytest.raises(StoreVersionError, match="newer release"):
        Store(db_url)


def test_store_from_an_older_known_revision_says_how_to_upgrade(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(sqlite_url)
    known = [*schema.known_revisions(), "9999_next"]
    monkeypatch.setattr(schema, "HEAD_REVISION", "9999_next")
    monkeypatch.setattr(schema, "known_revisions", lambda: known)
    with pytest.raises(StoreVersionError, match="durable-monty-nb upgrade --db"):
        Store(sqlite_url)


def test_alembic_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = f"sqlite:///{tmp_path / 'migrated.db'}"
    engine = sa.create_engine(url)
    schema.upgrade(url)  # an empty database built by the Alembic migrations, not create_all
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": schema.VERSION_TABLE})
        assert compare_metadata(context, metadata) == []
    assert schema.read_revision(engine) == schema.HEAD_REVISION


def test_upgrade_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    out = subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", "upgrade", "--db", url], capture_output=True, text=True, check=True
    ).stdout
    assert schema.HEAD_REVISION in out


def test_tampered_checkpoint_is_refused_and_never_loaded(engine: Engine) -> None:
    execution_id = interrupted_run(engine)
    with engine.store.engine.begin() as conn:
        data = conn.execute(
            sa.text("SELECT data FROM dm_checkpoints WHERE execution_id = :e"), {"e": execution_id}
        ).scalar()
        conn.execute(
            sa.text("UPDATE dm_checkpoints SET data = :d WHERE execution_id = :e"),
            {"d": data[:-1] + bytes([data[-1] ^ 1]), "e": execution_id},
        )
    with pytest.raises(TamperedDataError, match=r"checkpoint .* failed its integrity check"):
        engine.resume("tamper", resume_namespace())
    row = engine.store.latest_execution("tamper")
    assert row.status == "interrupted" and row.lease_owner is None


def test_tampered_call_result_is_refused(engine: Engine) -> None:
    execution_id = interrupted_run(engine)
    with engine.store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE dm_calls SET result = '666' WHERE execution_id = :e AND call_id = 1"), {"e": execution_id}
        )
    with pytest.raises(TamperedDataError, match="result of call 1"):
        engine.resume("tamper", resume_namespace())


def test_tampered_pickle_is_refused(engine: Engine) -> None:
    interrupted_run(engine)
    with engine.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE dm_blobs SET data = :d"), {"d": b"cos\nsystem\n(S'echo pwned'\ntR."})
    run = engine.resume("tamper", resume_namespace())
    with pytest.raises(TamperedDataError, match=r"stored value .* failed its integrity check"):
        run.result(timeout=30)
    assert engine.store.latest_execution("tamper").status == "interrupted"


def test_tampered_code_is_refused(sqlite_engine: Engine) -> None:
    execution_id = interrupted_run(sqlite_engine)
    with sqlite_engine.store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM dm_checkpoints"))
        conn.execute(sa.text("UPDATE dm_executions SET code = 'import os' WHERE id = :e"), {"e": execution_id})
    with pytest.raises(TamperedDataError, match="code of execution"):
        sqlite_engine.resume("tamper", resume_namespace())


def test_rows_signed_with_another_key_are_refused(sqlite_url: str) -> None:
    interrupted_run(Engine(sqlite_url))
    with pytest.raises(TamperedDataError, match="another signing key"):
        Engine(sqlite_url, secret="some-other-key").resume("tamper", resume_namespace())


def test_key_file_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DURABLE_MONTY_KEY", raising=False)
    key_file = tmp_path / "conf" / "secret.key"
    monkeypatch.setenv("DURABLE_MONTY_KEY_FILE", str(key_file))
    first = Signer()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Signer().sign("x", b"data") == first.sign("x", b"data")  # the same key is read back


def test_sqlite_runs_in_wal_mode_with_full_sync(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_plain_file_path_is_accepted(tmp_path: Path) -> None:
    store = Store(tmp_path / "plain.db")
    assert store.url == f"sqlite:///{tmp_path / 'plain.db'}"


def _insert_execution(store: Store, owner: str, expires_in: float) -> str:
    values = {
        "id": "e" * 32,
        "key": "lease",
        "status": "running",
        "code": "1",
        "code_hash": "h",
        "code_sig": "s",
        "monty_version": "1.4.0",
        "fingerprints": None,
        "previous_id": None,
    }
    assert store.create_execution(values, owner, expires_in, expected_latest=None)
    return values["id"]


def test_lease_of_a_live_owner_is_not_taken(db_url: str) -> None:
    store = Store(db_url)
    execution_id = _insert_execution(store, new_owner(), 60)
    assert store.acquire_lease(execution_id, new_owner(), 60) is not None


def test_expired_lease_of_another_machine_is_taken_over(db_url: str) -> None:
    store = Store(db_url)
    foreign = "other-host/abcd:4242:99:ffffffffffff"
    execution_id = _insert_execution(store, foreign, -1)  # its heartbeat stopped
    me = new_owner()
    assert store.acquire_lease(execution_id, me, 60) is None
    assert store.get_execution(execution_id).lease_owner == me


def test_lease_of_a_dead_local_process_is_taken_at_once(db_url: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = new_owner().split(":")
    dead[1] = str(proc.pid)
    dead_owner = ":".join(dead)
    assert owner_is_dead(dead_owner)
    store = Store(db_url)
    execution_id = _insert_execution(store, dead_owner, 3600)  # not expired, but its process is gone
    assert store.acquire_lease(execution_id, new_owner(), 60) is None


def test_lease_of_a_killed_but_unreaped_process_is_taken_at_once(db_url: str) -> None:
    """A SIGKILLed kernel its parent has not reaped yet (a zombie) is dead, not an owner."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "print('up', flush=True); import time; time.sleep(600)"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        owner = new_owner().split(":")
        owner[1], owner[2] = str(proc.pid), _process_start(proc.pid)
        zombie_owner = ":".join(owner)
        assert not owner_is_dead(zombie_owner)  # alive: its lease holds
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _proc_stat(proc.pid)[0] != "Z":  # killed; nobody has called wait() yet
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        assert owner_is_dead(zombie_owner)
        store = Store(db_url)
        execution_id = _insert_execution(store, zombie_owner, 3600)
        assert store.acquire_lease(execution_id, new_owner(), 60) is None
    finally:
        proc.kill()
        proc.wait()


def test_a_writer_that_lost_its_lease_cannot_commit(db_url: str) -> None:
    from durable_monty_nb.errors import LeaseLost
    from durable_monty_nb.store.store import Step

    store = Store(db_url)
    old = "other-host/abcd:4242:99:ffffffffffff"
    execution_id = _insert_execution(store, old, -1)
    assert store.acquire_lease(execution_id, new_owner(), 60) is None
    with pytest.raises(LeaseLost):
        store.commit(execution_id, old, 60, Step(execution={"status": "failed"}))
    assert store.get_execution(execution_id).status == "running"


def _call_row(execution_id: str, call_id: int, **values: object) -> dict[str, object]:
    row = pending_call_row(execution_id, call_id, "task", "f", f"[[{call_id}],{{}}]", f"k{call_id}")
    row.update(values)
    return row


def _done(call_id: int) -> dict[str, object]:
    return {
        "call_id": call_id,
        "status": "done",
        "attempts": 1,
        "result": str(call_id * 2),
        "error": None,
        "error_type": None,
        "error_message": None,
        "due_at": None,
        "started_at": 1.0,
        "finished_at": 2.0,
        "worker": None,
    }


def test_a_step_of_a_lost_lease_writes_nothing(db_url: str) -> None:
    """A whole driver step (a new call, a result, the checkpoint, the counters) from a writer whose
    lease was taken over raises LeaseLost and leaves every row as it was. On PostgreSQL the step
    goes in one pipeline and the fence fails on the server; the connection given back after it
    still runs transactions all or nothing (a step that fails half-way writes nothing). On SQLite
    a step that only writes runs in the DBAPI connection's own transaction, one that reads (a new
    blob) in SQLAlchemy's: both all or nothing."""
    from durable_monty_nb.errors import LeaseLost
    from durable_monty_nb.store.store import Step
    from durable_monty_nb.store.transient import is_integrity_error
    from durable_monty_nb.values import blob_key

    store = Store(db_url)
    old = "other-host/abcd:4242:99:ffffffffffff"
    execution_id = _insert_execution(store, old, 60)
    store.commit(execution_id, old, -1, Step(new_calls=[_call_row(execution_id, 1)], checkpoint=b"first"))
    taker = new_owner()
    assert store.acquire_lease(execution_id, taker, 60) is None  # the old lease expired: taken over

    def step() -> Step:
        return Step(
            new_calls=[_call_row(execution_id, 2)],
            call_updates=[_done(1)],
            checkpoint=b"second",
            execution={"calls_total": 2, "calls_done": 1},
        )

    for _ in range(2):  # and again on the connection given back after the first
        with pytest.raises(LeaseLost):
            store.commit(execution_id, old, 60, step())
    with pytest.raises(LeaseLost):  # the fence decides first: not the collision with the taker's row
        store.commit(execution_id, old, 60, Step(new_calls=[_call_row(execution_id, 1)], checkpoint=b"x"))
    assert [(r.call_id, r.status, r.result) for r in store.load_calls(execution_id)] == [(1, "pending", None)]
    assert store.load_checkpoint(execution_id) == b"first"
    row = store.get_execution(execution_id)
    assert (row.lease_owner, row.calls_total, row.calls_done) == (taker, 0, 0)

    with store.engine.begin() as conn:  # the lease back to the old writer
        conn.execute(
            sa.text("UPDATE dm_executions SET lease_owner = :o, lease_expires_at = :t WHERE id = :e"),
            {"o": old, "t": time.time() + 60, "e": execution_id},
        )
    collides = Step(new_calls=[_call_row(execution_id, 1)], checkpoint=b"x", execution={"calls_total": 9})
    with pytest.raises(Exception) as raised:  # a step that fails: none of it lands
        store.commit(execution_id, old, 60, collides)
    assert is_integrity_error(raised.value)
    assert store.load_checkpoint(execution_id) == b"first"
    assert store.get_execution(execution_id).calls_total == 0
    data = b"a value"
    broken = Step(  # a new blob (read in the transaction), then a call row that exists
        new_calls=[_call_row(execution_id, 3), _call_row(execution_id, 1)],
        blobs={blob_key(data): (data, "bytes")},
        checkpoint=b"third",
    )
    with pytest.raises(Exception) as raised:
        store.commit(execution_id, old, 60, broken)
    assert is_integrity_error(raised.value)
    assert [r.call_id for r in store.load_calls(execution_id)] == [1]
    assert store.load_checkpoint(execution_id) == b"first"
    with pytest.raises(KeyError):
        store.load_blob(blob_key(data))

    store.commit(execution_id, old, 60, step())  # the lease holder's step lands whole
    assert [(r.call_id, r.status, r.result) for r in store.load_calls(execution_id)] == [
        (1, "done", "2"),
        (2, "pending", None),
    ]
    assert store.load_checkpoint(execution_id) == b"second"
    assert (store.get_execution(execution_id).calls_total, store.get_execution(execution_id).calls_done) == (2, 1)
    store.close()


def test_steps_journal_attempts_and_mark_lost_ones(db_url: str) -> None:
    """The steps of a durable executor: new calls with their attempts, then an attempt found lost
    beside a result (on PostgreSQL each step one statement)."""
    from durable_monty_nb.executors.record import AttemptRecord
    from durable_monty_nb.store.store import Step

    store = Store(db_url)
    owner = new_owner()
    execution_id = _insert_execution(store, owner, 60)
    ids = [f"dm-{execution_id}-{i}-1" for i in (1, 2)]
    attempts = [
        {
            "attempt_id": attempt,
            "execution_id": execution_id,
            "call_id": i,
            "attempt": 1,
            "executor": "rq",
            "status": "dispatched",
            "created_at": 5.0,
        }
        for attempt, i in zip(ids, (1, 2), strict=True)
    ]
    new = [_call_row(execution_id, 1), _call_row(execution_id, 2)]
    store.commit(execution_id, owner, 60, Step(new_calls=new, attempts=attempts, checkpoint=b"one"))
    store.commit(execution_id, owner, 60, Step(call_updates=[_done(2)], lost_attempts=[ids[0]], checkpoint=b"two"))
    found = store.load_attempts(ids)
    assert {a: found[a].status for a in ids} == {ids[0]: "lost", ids[1]: "dispatched"}
    assert [(r.call_id, r.status) for r in store.load_calls(execution_id)] == [(1, "pending"), (2, "done")]
    assert store.load_checkpoint(execution_id) == b"two"

    # An attempt a worker finished before the driver's step said it lost (it took the job as the
    # driver withdrew it): the outcome stays, so a resume takes it instead of running the call again.
    outcome = AttemptRecord(ids[1], execution_id, 2, 1, "done", "rq", "w:1", "4", started_at=1.5)
    outcome.finished_at = 2.5
    store.finish_attempts([outcome.sign(store.signer)], {})
    store.commit(execution_id, owner, 60, Step(lost_attempts=[ids[1]], checkpoint=b"three"))
    assert store.load_attempts([ids[1]])[ids[1]] == outcome
    store.close()


def test_a_workers_read_of_one_attempt_is_the_stores_record_verified(db_url: str) -> None:
    """What a worker reads before it runs an attempt (has another worker run it already?): none
    before it is journaled, then the dispatched row, then its signed outcome, as ``load_attempts``
    gives them; an outcome edited in the database is refused."""
    from durable_monty_nb.executors.record import AttemptRecord
    from durable_monty_nb.store.store import Step

    store = Store(db_url)
    owner = new_owner()
    execution_id = _insert_execution(store, owner, 60)
    attempt = f"dm-{execution_id}-1-1"
    assert store.load_attempt(attempt) is None
    row = {"attempt_id": attempt, "execution_id": execution_id, "call_id": 1, "attempt": 1}
    row.update(executor="dask", status="dispatched", created_at=5.0)
    store.commit(execution_id, owner, 60, Step(new_calls=[_call_row(execution_id, 1)], attempts=[row]))
    dispatched = store.load_attempt(attempt)
    assert dispatched is not None and (dispatched.status, dispatched.finished) == ("dispatched", False)

    outcome = AttemptRecord(attempt, execution_id, 1, 1, "done", "dask", "tcp://w:1", "42", started_at=1.5)
    outcome.finished_at = 2.5
    store.finish_attempts([outcome.sign(store.signer)], {})
    read = store.load_attempt(attempt)
    assert read == store.load_attempts([attempt])[attempt] == outcome

    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE dm_attempts SET result = '43' WHERE attempt_id = :a"), {"a": attempt})
    with pytest.raises(TamperedDataError, match="the outcome of attempt 1 of call 1"):
        store.load_attempt(attempt)
    store.close()


def test_heartbeat_keeps_the_lease_fresh(sqlite_url: str) -> None:
    engine = Engine(sqlite_url, lease_ttl=0.6)  # heartbeat every 0.2 s
    release = threading.Event()
    seen: list[float] = []

    def slow(x: int) -> int:
        release.wait(30)
        return x

    run = engine.start("await slow(1)", {"slow": slow}, key="heartbeat")
    deadline = time.monotonic() + 30
    while len(set(seen)) < 3 and time.monotonic() < deadline:
        seen.append(engine.store.latest_execution("heartbeat").lease_expires_at)
        time.sleep(0.05)
    release.set()
    assert run.result(timeout=30) == 1
    assert len(set(seen)) >= 3  # the expiry moved forward while the call ran
    assert all(b >= a for a, b in itertools.pairwise(seen))


def test_environment_key_is_used(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_MONTY_KEY", "k1")
    one = Signer().sign("c", b"x")
    assert one == Signer(secret="k1").sign("c", b"x")  # the variable's value is the key
    monkeypatch.setenv("DURABLE_MONTY_KEY", "k2")
    assert Signer().sign("c", b"x") == Signer(secret="k2").sign("c", b"x") != one
    # A store's rows are signed with it: what k2 wrote is refused under k1, and read back under k2.
    interrupted_run(Engine(sqlite_url))
    monkeypatch.setenv("DURABLE_MONTY_KEY", "k1")
    with pytest.raises(TamperedDataError, match="another signing key"):
        Engine(sqlite_url).resume("tamper", resume_namespace())
    monkeypatch.setenv("DURABLE_MONTY_KEY", "k2")
    assert Engine(sqlite_url).resume("tamper", resume_namespace()).result(timeout=30) == [[1, 2], 3]


def test_durability_levels_set_what_the_database_syncs(db_url: str, tmp_path: Path) -> None:
    """full: every commit on disk before it returns; process: survives a crash of the process only."""
    backend = sa.engine.make_url(db_url).get_backend_name()
    for level, sqlite_sync, pg_commit in (("full", 2, "on"), ("process", 1, "off")):
        store = Store(db_url, durability=level)
        with store.engine.connect() as conn:
            if backend == "sqlite":
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == sqlite_sync
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            elif backend == "postgresql":
                assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == pg_commit
        engine = Engine(db_url, durability=level)
        assert engine.run("await f(2)", {"f": lambda x: x * 21}, key=f"durability-{level}") == 42
        engine.close()
        store.close()
    with pytest.raises(ValueError, match="durability must be one of full, process, not 'fast'"):
        Engine(tmp_path / "x.db", durability="fast")


def _downgrade(url: str, revision: str) -> None:
    """Take a store back to an older schema revision with the migrations' own downgrades (its rows stay)."""
    from alembic import command
    from alembic.config import Config

    engine = sa.create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(schema.MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)
    engine.dispose()


@pytest.mark.parametrize("revision", ["0001_initial", "0002_remote_attempts"])
def test_upgrade_of_an_older_store_that_holds_work(db_url: str, revision: str) -> None:
    """A store at an older revision, with a completed execution (its result, a stored object) and
    an interrupted one (its checkpoint and committed calls): `durable-monty-nb upgrade` brings it
    to the head, and both are used as before: the stored result back, the resume running only
    the calls that had not finished."""
    import pandas as pd

    def frame(n: int) -> object:
        return pd.DataFrame({"n": range(n)})

    code, ns = "f = await frame(4)\nn = await rows(f)\nn", {"frame": frame, "rows": len}
    engine = Engine(db_url)
    done = engine.run(code, ns, key="finished")
    interrupted_run(engine, key="half")
    engine.close()
    _downgrade(db_url, revision)
    assert schema.read_revision(sa.create_engine(db_url)) == revision
    with pytest.raises(StoreVersionError, match="durable-monty-nb upgrade --db"):
        Store(db_url)

    out = subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", "upgrade", "--db", db_url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert schema.HEAD_REVISION in out
    engine = Engine(db_url)
    try:
        again = engine.start(code, ns, key="finished")
        assert again.cached and again.result(30) == done == 4
        assert list(again.outputs["f"]["n"]) == [0, 1, 2, 3]  # the stored object, read back
        resumed = engine.resume("half", resume_namespace())  # frame(3) must not run again
        assert resumed.result(timeout=30) == [[1, 2], 3]
        assert resumed.progress.restored == 3
        mail = engine.start('v = await signal("go")\nv', {}, key="mail")  # what the newer revisions added works
        engine.signal("mail", "go", "delivered")
        assert mail.result(30) == "delivered"
    finally:
        engine.close()


def test_signer_tags_are_hmac_sha256_of_context_and_data() -> None:
    """A copied keyed HMAC gives the tags ``hmac.new`` gives (rows signed before stay valid),
    for keys shorter and longer than SHA-256's block and data joined to its context or not."""
    import hashlib
    import hmac

    for key in (b"k", b"x" * 64, b"y" * 65, b"z" * 300):
        signer = Signer(key)
        for data in (b"", b"done\x002", b"q" * 5000):
            mac = hmac.new(key, b"call:e:1", hashlib.sha256)
            mac.update(b"\0")
            mac.update(data)
            assert signer.sign("call:e:1", data) == mac.hexdigest()


def test_a_step_of_many_results_lands_every_row_signed(db_url: str) -> None:
    """A step that updates 2,345 call rows (on SQLite: statements of a hundred rows each, the last
    one shorter) writes each row's own values and signature."""
    from durable_monty_nb.store.store import Step

    store = Store(db_url)
    owner = new_owner()
    execution_id = _insert_execution(store, owner, 60)
    n = 2345
    new = [_call_row(execution_id, i, gather_id=1) for i in range(n)]
    store.commit(execution_id, owner, 60, Step(new_calls=new))
    updates = [
        {
            "call_id": i,
            "status": "done",
            "attempts": 1,
            "result": str(i * 2),
            "error": None,
            "error_type": None,
            "error_message": None,
            "due_at": None,
            "started_at": float(i),
            "finished_at": float(i) + 0.5,
            "worker": None,
        }
        for i in range(n)
    ]
    store.commit(execution_id, owner, 60, Step(call_updates=updates))
    rows = store.load_calls(execution_id)
    assert [(r.call_id, r.status, r.result, r.attempts, r.started_at) for r in rows] == [
        (i, "done", str(i * 2), 1, float(i)) for i in range(n)
    ]
    for row in rows:
        store.verify_call(execution_id, row)  # raises TamperedDataError on a wrong signature
