"""A real kernel killed with SIGKILL while 100 calls are queued or running on RQ or Dask workers.

The workers go on without it. A new kernel runs the same cells: the run re-attaches, collects
what finished meanwhile, waits for what still runs, and no call runs twice.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from kernels import Kernel, dask_config, rq_config
from procs import wait_until
from test_dask import Cluster
from test_rq import TESTS, Workers

pytestmark = pytest.mark.kernel

CALLS = 100
HELD_FROM = 10  # calls from this one on wait while the gate file exists

DEFINE = f"""
import os, time

LOG = os.environ["SIDE_LOG"]
GATE = os.environ["GATE_FILE"]


def work(i):  # defined in a cell: it reaches the workers by value
    with open(LOG, "a") as handle:
        handle.write(f"{{os.getpid()}} {{i}}\\n")
    while i >= {HELD_FROM} and os.path.exists(GATE):  # test scaffolding: hold calls while the gate exists
        time.sleep(0.01)
    return i * i


items = list(range({CALLS}))
"""
CELL = "%%durable squares\nvalues = await gather(*[work(i) for i in items])\ntotal = sum(values)\ntotal"
TOTAL = sum(i * i for i in range(CALLS))


def calls_logged(log: Path) -> list[int]:
    return [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []


def attempts_journaled(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM dm_attempts").fetchone()[0]
    except sqlite3.Error:
        return 0


def kill_mid_run_then_rerun(tmp_path: Path, configure: str) -> None:
    log, gate, db = tmp_path / "side.log", tmp_path / "gate", tmp_path / "notebook.db"
    env = {"SIDE_LOG": str(log), "GATE_FILE": str(gate), "DURABLE_MONTY_DB": f"sqlite:///{db}"}
    gate.touch()
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(configure)
        kernel.ok(DEFINE)
        cell = kernel.submit(CELL)
        try:
            wait_until(
                lambda: attempts_journaled(db) == CALLS and len(calls_logged(log)) >= HELD_FROM + 2,
                what="all calls dispatched, the first ones done and two held on the workers",
            )
        except AssertionError as exc:  # say what the kernel did instead
            reply = kernel.collect(cell, timeout=5)
            raise AssertionError(f"{exc}: {attempts_journaled(db)} attempts, log {calls_logged(log)}, {reply}") from exc
    finally:
        kernel.kill()
    gate.unlink()  # the workers go on without the kernel: calls finish while it is dead
    wait_until(lambda: len(calls_logged(log)) >= HELD_FROM + 20, what="calls finishing while the kernel is dead")

    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(configure)
        kernel.ok(DEFINE)
        assert kernel.ok(CELL, timeout=240).result == str(TOTAL)
        assert kernel.ok("values[-1]").result == str((CALLS - 1) ** 2)
    finally:
        kernel.close()
    assert sorted(calls_logged(log)) == list(range(CALLS))  # every call ran exactly once


def test_rq_calls_survive_a_killed_kernel(redis_url: str, tmp_path: Path) -> None:
    workers = Workers(redis_url, f"kernel-{tmp_path.name[-12:]}", {"PYTHONPATH": str(TESTS)})
    workers.start(2)
    try:
        kill_mid_run_then_rerun(tmp_path, rq_config(redis_url, workers.queue))
    finally:
        workers.stop()


def test_dask_calls_survive_a_killed_kernel(own_dask_cluster: Cluster, tmp_path: Path) -> None:
    configure = dask_config(own_dask_cluster.address)
    kill_mid_run_then_rerun(tmp_path, configure)
