"""Keeping the store small: forget, prune, sizes, on every backend, beside a second live process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from procs import wait_until
from retention_runner import LIVE_CODE

from durable_monty_nb import Engine, ForgetRefused
from durable_monty_nb.store.retention import HANDLE, parse_age
from durable_monty_nb.values import ValueCodec

TESTS = Path(__file__).resolve().parent
CODE = "xs = await gather(*[make(i) for i in items])\nys = [await total(x) for x in xs]\n"
LIVE_RESULT = {"sums": [0, 2000, 4000, 6000], "first": [0, 1, 2, 3], "sizes": [2000] * 4}


def make(i: int) -> np.ndarray:
    return np.full(2000, i, dtype=np.int64)  # the same bytes as the live process's arrays: the same blobs


def total(x: np.ndarray) -> int:
    return int(x.sum())


def namespace() -> dict[str, Any]:
    return {"make": make, "total": total, "items": [0, 1, 2, 3]}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))}


@pytest.fixture
def live(db_url: str, tmp_path: Path) -> Iterator[Any]:
    """A real second process on the store: it runs the workflow ``live`` from ``start()``, held
    mid-run until ``release()``."""
    begin, gate = tmp_path / "start", tmp_path / "gate"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "retention_runner.py"), db_url, str(begin), str(gate)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )

    class Live:
        process = proc

        @staticmethod
        def start() -> None:
            begin.touch()

        @staticmethod
        def release() -> dict[str, Any]:
            gate.touch()
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"the live process failed:\n{out}\n{err}"
            return json.loads(out.split("RESULT ", 1)[1])

    try:
        yield Live
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_running(engine: Engine, proc: subprocess.Popen[str]) -> Any:
    """The live execution once it runs with its first results committed (its lease held)."""

    def started() -> Any:
        row = engine.store.latest_execution("live")
        return row if row is not None and row.calls_done >= 2 and row.lease_owner else None

    return wait_until(started, timeout=90, what="the live execution running", procs=(proc,))


def table_rows(engine: Engine, sql: str) -> list[Any]:
    with engine.store.engine.connect() as conn:
        return list(conn.execute(sa.text(sql)).all())


def check_consistent(engine: Engine) -> None:
    """No half-deleted execution is visible, no row is orphaned, every value a result refers to loads."""
    store = engine.store
    visible = {row.id: row for row in store.list_executions(latest_only=False)}
    for row in visible.values():
        assert len(store.load_calls(row.id)) == row.calls_total, f"execution {row.id} lost calls"
        codec = ValueCodec(store.load_blob)
        for call in store.load_calls(row.id):  # every stored value it refers to is there and verified
            codec.decode_host(call.result)
        codec.decode_host(row.result)
    ids = {r[0] for r in table_rows(engine, "SELECT id FROM dm_executions")}
    for table in ("dm_calls", "dm_checkpoints", "dm_attempts", "dm_signals"):
        orphans = {r[0] for r in table_rows(engine, f"SELECT DISTINCT execution_id FROM {table}")} - ids
        assert not orphans, f"{table} has rows of deleted executions {orphans}"


def blob_keys(engine: Engine) -> set[str]:
    from durable_monty_nb.store.store import BLOBS

    with engine.store.engine.connect() as conn:
        return set(conn.execute(sa.select(BLOBS.c.key)).scalars())


def referenced_blobs(engine: Engine) -> set[str]:
    found: set[str] = set()
    for args, result in table_rows(engine, "SELECT args, result FROM dm_calls"):
        found.update(HANDLE.findall(args or ""), HANDLE.findall(result or ""))
    for result, outputs in table_rows(engine, "SELECT result, outputs FROM dm_executions"):
        found.update(HANDLE.findall(result or ""), HANDLE.findall(outputs or ""))
    return found


def test_prune_and_forget_beside_a_live_process(engine: Engine, live: Any) -> None:
    ns = namespace()
    for n in range(3):  # three edits of one cell: three executions, the later reusing the earlier's calls
        engine.run(CODE + f"{n}\n(ys, xs)", ns, key="old")
    engine.run(CODE + "(ys, xs)", ns, key="gone")  # another workflow storing the same arrays
    engine.run(LIVE_CODE, ns, key="live")  # the live process's workflow, earlier: its own functions
    engine.run(LIVE_CODE + "\n1", ns, key="live")
    kept = engine.store.latest_execution("old")
    shared = referenced_blobs(engine)
    assert len(shared) == 4  # one blob per array, shared by every execution of both workflows

    live.start()  # after the executions above: the live process's run is the workflow's latest
    running = wait_running(engine, live.process)
    with pytest.raises(ForgetRefused) as refused:
        engine.forget("live")
    assert f"process {live.process.pid}" in str(refused.value)  # who drives it
    assert engine.store.latest_execution("live").id == running.id

    planned = engine.prune(dry_run=True)
    assert sorted(key for _, key in planned.executions) == ["old", "old"]
    assert planned.calls == 16 and planned.bytes > 0
    assert len(engine.executions(all=True, key="old")) == 3  # a dry run changes nothing

    removal = engine.prune()
    assert sorted(key for _, key in removal.executions) == ["old", "old"]
    assert "live" in removal.skipped_live
    assert len(engine.executions(all=True, key="live")) == 3  # nothing of a workflow that runs
    assert [row.id for row in engine.executions(all=True, key="old")] == [kept.id]
    assert removal.blobs == 0  # the arrays are still used by the kept execution and the others

    engine.forget("gone")
    assert engine.executions(all=True, key="gone") == []
    assert shared <= referenced_blobs(engine)  # every array the kept execution refers to survived
    again = engine.start(CODE + "2\n(ys, xs)", ns, key="old")
    assert again.cached
    ys, xs = again.result()
    assert ys == [0, 2000, 4000, 6000] and [int(x[0]) for x in xs] == [0, 1, 2, 3]

    assert live.release() == LIVE_RESULT  # the live process's run was never disturbed
    row = engine.store.latest_execution("live")
    assert row.id == running.id and row.status == "completed"
    ys, xs = ValueCodec(engine.store.load_blob).decode_host(row.result)  # its arrays are in the store
    assert ys == LIVE_RESULT["sums"] and [len(x) for x in xs] == [2000] * 4
    check_consistent(engine)
    assert len(engine.prune().executions) == 2  # now the live workflow's earlier executions go
    assert [r.id for r in engine.executions(all=True, key="live")] == [running.id]

    engine.forget("old")
    engine.forget("live")
    assert engine.executions(all=True) == []
    assert blob_keys(engine) == set()  # nothing references them any more
    assert table_rows(engine, "SELECT latest_execution_id FROM dm_keys") == []


def test_a_blob_only_the_pruned_execution_used_goes_and_the_shared_one_stays(engine: Engine) -> None:
    def big(i: int) -> np.ndarray:
        return np.full(50_000, i, dtype=np.int64)

    ns = {"big": big}
    engine.run("a = await big(1)\nb = await big(2)\n[a, b]", ns, key="k")  # arrays 1 and 2
    engine.run("a = await big(1)\nb = await big(3)\n[a, b]", ns, key="k")  # array 1 reused, 3 new
    assert len(blob_keys(engine)) == 3
    planned = engine.prune(dry_run=True)
    assert planned.blobs == 1 and planned.bytes > 400_000  # array 2: 400 KB of its own
    removal = engine.prune(vacuum=True)
    assert removal.blobs == 1 and len(removal.executions) == 1
    if engine.store.backend == "sqlite":  # the file gives the space back
        assert removal.store_bytes_after < removal.store_bytes_before - 300_000
    left = engine.start("a = await big(1)\nb = await big(3)\n[a, b]", ns, key="k")
    a, b = left.result()
    assert left.cached and int(a[0]) == 1 and int(b[0]) == 3
    assert len(blob_keys(engine)) == 2
    check_consistent(engine)


def test_prune_keeps_unfinished_executions_and_honours_age_and_count(engine: Engine) -> None:
    ns = namespace()
    for n in range(4):
        engine.run(CODE + f"{n}\nys", ns, key="many")

    def broken(x: Any) -> int:
        raise ValueError("boom")

    with pytest.raises(Exception, match="boom"):
        engine.run(CODE + "9\nys", {**ns, "total": broken}, key="many")  # the latest: failed
    assert engine.prune(older_than="1d").executions == []  # all finished just now
    removal = engine.prune(keep_latest=2)
    assert len(removal.executions) == 2
    rows = engine.executions(all=True, key="many")
    assert [r.status for r in rows] == ["failed", "completed", "completed"]
    engine.prune(keep_latest=0)
    assert [r.status for r in engine.executions(all=True, key="many")] == ["failed"]  # never an unfinished one
    check_consistent(engine)


def test_kill_9_mid_prune_leaves_a_consistent_store_and_a_second_prune_finishes(engine: Engine) -> None:
    def task(i: int) -> int:
        return i * 2

    ns = {"task": task, "make": make}
    big = "xs = await gather(*[task(i) for i in range(2500)])\narr = await make({n})\nsum(xs)"
    for n in range(12):  # each edit: 2,500 calls (reused from the one before) and an array of its own
        engine.run(big.format(n=n), ns, key="big")
    kept = engine.store.latest_execution("big")
    command = [sys.executable, "-m", "durable_monty_nb", "prune", "--db", engine.store.url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())

    def deleting() -> int:
        return len(table_rows(engine, "SELECT id FROM dm_executions WHERE status = 'deleting'"))

    wait_until(deleting, timeout=60, what="the prune deleting", procs=(proc,))
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert deleting() > 0, "the prune finished before the kill: nothing was tested"
    check_consistent(engine)  # half-deleted executions are invisible, the rest whole
    again = engine.start(big.format(n=11), ns, key="big")
    assert again.cached and again.result() == 2 * sum(range(2500))

    finished = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert deleting() == 0
    assert [r.id for r in engine.executions(all=True, key="big")] == [kept.id]
    assert table_rows(engine, "SELECT execution_id FROM dm_checkpoints") == []  # nothing loads a completed one's
    check_consistent(engine)
    blobs = blob_keys(engine)
    assert blobs == referenced_blobs(engine)  # the arrays of the pruned executions went, the kept one's stayed
    assert len(blobs) == 1


def test_status_shows_the_store_size_and_what_each_workflow_takes(engine: Engine) -> None:
    from durable_monty_nb.notebook.status import status_report

    def big(i: int) -> np.ndarray:  # 400 KB of noise: PostgreSQL compresses what it can
        return np.random.default_rng(i).integers(0, 2**62, 50_000, dtype=np.int64)

    engine.run("await big(1)", {"big": big}, key="heavy")
    engine.run("await big(2)", {"big": big}, key="heavy")
    engine.run("1 + 1", {}, key="light")
    sizes = engine.sizes()
    assert sizes.workflows["heavy"].executions == 2 and sizes.workflows["light"].executions == 1
    assert sizes.workflows["heavy"].bytes > 800_000 > sizes.workflows["light"].bytes  # two 400 KB arrays
    assert sizes.total_bytes > 800_000
    text = status_report(engine.store).text
    assert "runs" in text and "size" in text and "MB" in text


def test_forget_one_execution_by_id_keeps_the_rest_of_the_workflow(engine: Engine) -> None:
    ns = namespace()
    engine.run(CODE + "0\nys", ns, key="w")
    first = engine.store.latest_execution("w")
    engine.run(CODE + "1\nys", ns, key="w")
    latest = engine.store.latest_execution("w")
    engine.forget(first.id[:12])
    assert [r.id for r in engine.executions(all=True, key="w")] == [latest.id]
    engine.forget(latest.id)  # the last one: the workflow is gone
    assert engine.store.latest_execution("w") is None
    assert engine.run(CODE + "1\nys", ns, key="w") == [0, 2000, 4000, 6000]  # runs afresh
    check_consistent(engine)


def test_automatic_retention_prunes_old_completed_executions(sqlite_url: str) -> None:
    first = Engine(sqlite_url)
    for n in range(3):
        first.run(CODE + f"{n}\nys", namespace(), key="auto")
    first.close()
    with pytest.raises(ValueError, match="duration"):
        Engine(sqlite_url, retention="soon")
    engine = Engine(sqlite_url, retention=0)
    try:
        engine.run("1", {}, key="other")
        wait_until(lambda: len(engine.executions(all=True, key="auto")) == 1, what="the automatic prune")
    finally:
        engine.close()


def test_ages() -> None:
    assert parse_age("7d") == 7 * 86400 and parse_age("12h") == 43200 and parse_age("30m") == 1800
    assert parse_age("45s") == 45 and parse_age(90) == 90 and parse_age(None) is None
    for bad in ("-1d", "7 days", "", True, float("nan")):
        with pytest.raises(ValueError):
            parse_age(bad)  # type: ignore[arg-type]


def test_upgrade_to_lighter_calls_keeps_older_calls_reusable(db_url: str) -> None:
    """A store written at 0003 (calls carrying their execution's key and a 64-hex HMAC), upgraded:
    an edited cell still reuses its calls, whose old signatures still verify."""
    from alembic import command
    from alembic.config import Config

    from durable_monty_nb.engine.fingerprint import function_fingerprint, sha256
    from durable_monty_nb.store import schema
    from durable_monty_nb.store.signing import Signer
    from durable_monty_nb.store.store import _signed_text

    ran: list[int] = []

    def a(x: int) -> int:
        ran.append(x)
        return x * 10

    config = Config()
    config.set_main_option("script_location", str(schema.MIGRATIONS))
    config.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    db = sa.create_engine(db_url)
    tables = sa.MetaData()
    tables.reflect(db)  # a server database of the session holds the tables of earlier tests: start empty
    tables.drop_all(db)
    with db.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003_signals")
    signer, now, eid, key = Signer(), 1.0e9, "e" * 32, "nb.ipynb::cell-0123456789ab"
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO dm_executions (id, " + ("`key`" if db.dialect.name == "mysql" else "key") + ", status, "
                "code, code_hash, code_sig, monty_version, calls_total, calls_done, calls_failed, calls_reused, "
                "created_at, updated_at) VALUES (:id, :key, 'completed', 'x', 'h', 's', '1.4.0', 2, 2, 0, 0, :t, :t)"
            ),
            {"id": eid, "key": key, "t": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO dm_keys ("
                + ("`key`" if db.dialect.name == "mysql" else "key")
                + ", latest_execution_id, updated_at) VALUES (:k, :e, :t)"
            ),
            {"k": key, "e": eid, "t": now},
        )
        for call_id, x in ((0, 1), (1, 2)):
            args, result = f"[[{x}],{{}}]", str(x * 10)
            conn.execute(
                sa.text(
                    "INSERT INTO dm_calls (execution_id, call_id, exec_key, function, kind, fingerprint, args, "
                    "call_key, status, attempts, result, result_sig, created_at) VALUES (:e, :c, :k, 'a', 'call', "
                    ":f, :args, :ck, 'done', 1, :r, :sig, :t)"
                ),
                {
                    "e": eid,
                    "c": call_id,
                    "k": key,
                    "f": function_fingerprint(a),
                    "args": args,
                    "ck": sha256(f"a\0{function_fingerprint(a)}\0{args}"),
                    "r": result,
                    "sig": signer.sign_text(f"call:{eid}:{call_id}", _signed_text(("done", result, None, None, None))),
                    "t": now,
                },
            )
    db.dispose()
    schema.upgrade(db_url)
    engine = Engine(db_url)
    try:
        assert engine.run("await gather(a(1), a(2), a(3))", {"a": a}, key=key) == [10, 20, 30]
        assert ran == [3]  # the two calls stored before the upgrade were reused
        assert engine.prune().executions == [(eid, key)]
    finally:
        engine.close()


def test_an_outcome_written_for_a_forgotten_execution_is_collected(engine: Engine) -> None:
    """A worker that finishes an attempt of an execution forgotten meanwhile keeps its outcome
    (and the value it returned); the next prune removes both."""
    from durable_monty_nb.executors.record import AttemptRecord

    engine.run(CODE + "0\nys", namespace(), key="w")
    execution_id = engine.store.latest_execution("w").id
    engine.forget("w")
    codec = ValueCodec()
    result = codec.encode_text(make(7))
    record = AttemptRecord(f"dm-{execution_id}-0-1", execution_id, 0, 1, "done", "rq", "w1", result, finished_at=1.0)
    engine.store.finish_attempts([record.sign(engine.store.signer)], codec.pending_blobs)
    assert len(table_rows(engine, "SELECT attempt_id FROM dm_attempts")) == 1 and len(blob_keys(engine)) == 1
    engine.prune()
    assert table_rows(engine, "SELECT attempt_id FROM dm_attempts") == [] and blob_keys(engine) == set()
