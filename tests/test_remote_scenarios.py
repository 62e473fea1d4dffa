"""Workflow scenarios on every remote executor: an ``Engine`` on RQ (real Redis, two
``durable-monty-nb worker`` processes) and on Dask (a real scheduler, two ``dask worker``
processes), through one harness each.

A harness starts its service once per module (``test_rq.Workers``, ``test_dask.Cluster``),
brings back two live workers before each test, kills the worker running a call, and says
what its service still holds of a run. The workers cannot import the tests: every function
reaches them by value, as those of notebook cells do. Where the executors differ by design
(a timed-out RQ job is stopped, a Dask thread runs out), the harness says so and the scenario
checks each side. Executor-specific tests stay in test_rq.py and test_dask.py.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ci import REDIS_URL, require_module, unavailable
from procs import finish, kill, wait_until

from durable_monty_nb import Engine, WorkflowFailed, limits, retry
from durable_monty_nb.executors import create_backend
from durable_monty_nb.executors.base import attempt_id
from durable_monty_nb.store.store import Store

TESTS = Path(__file__).resolve().parent
WORKERS = 2


def without_tests(path: str) -> str:
    """A PYTHONPATH without the tests' directory (the workers must get functions by value)."""
    return os.pathsep.join(p for p in path.split(os.pathsep) if p and Path(p).resolve() != TESTS)


class OnRQ:
    """Two ``durable-monty-nb worker`` processes on a queue of this module's own."""

    name = "rq"
    stops_hung_calls = True  # a timed-out job's work horse is killed: its worker is free at once
    worker_name = re.compile(r".+:\d+")  # the worker's name and the pid of the work horse

    def __init__(self, directory: Path) -> None:
        require_module("rq", extra="rq")
        from redis import Redis
        from test_rq import Workers

        try:
            Redis.from_url(REDIS_URL, socket_connect_timeout=3).flushdb()
        except Exception as exc:
            unavailable(f"Redis ({REDIS_URL})", exc)
        self.redis = Redis.from_url(REDIS_URL)
        self.workers = Workers(REDIS_URL, "scenarios", {"PYTHONPATH": without_tests(os.environ.get("PYTHONPATH", ""))})
        self.settings = {"url": REDIS_URL, "queue": self.workers.queue}

    def ready(self) -> None:
        """Two live workers (a killed one is replaced)."""
        self.workers.procs = [proc for proc in self.workers.procs if proc.poll() is None]
        self.workers.start(WORKERS - len(self.workers.procs))

    def pids(self) -> set[int]:
        return {proc.pid for proc in self.workers.procs}

    def kill_worker_of(self, pid: int, parent: int) -> None:
        """Kill the worker whose work horse ``pid`` runs a call, and the horse (a process group of its own)."""
        (worker,) = [proc for proc in self.workers.procs if proc.pid == parent]
        self.workers.kill(worker)
        os.kill(pid, signal.SIGKILL)

    def pending(self, execution_id: str) -> int:
        """The run's jobs still queued or running on the workers."""
        from rq import Queue
        from rq.registry import StartedJobRegistry

        queue = Queue(self.workers.queue, connection=self.redis)
        ids = [*queue.get_job_ids(), *StartedJobRegistry(queue=queue).get_job_ids()]
        return sum(1 for job_id in ids if job_id.startswith(f"dm-{execution_id}-"))

    def drivers_following(self, execution_id: str) -> set[int] | None:
        return None  # RQ keeps no record of who waits for a job

    def close(self) -> None:
        self.workers.stop()


class OnDask:
    """A scheduler and two single-threaded workers (``test_dask.Cluster``)."""

    name = "dask"
    stops_hung_calls = False  # Dask cannot interrupt a thread: a timed-out task runs out, its result dropped
    worker_name = re.compile(r"tcp://127\.0\.0\.1:\d+")

    def __init__(self, directory: Path) -> None:
        require_module("distributed", extra="dask")
        from test_dask import Cluster

        self.cluster = Cluster(directory)
        self.settings = {"address": self.cluster.address}

    def ready(self) -> None:
        """Two live workers (a killed one is replaced) that have imported what a task runs, so a
        new worker's first call does not spend a short timeout on imports."""
        self.cluster.ready()
        for module in ("durable_monty_nb.executors.dask", "durable_monty_nb.store.store"):
            self.cluster.client.run(importlib.import_module, module)

    def pids(self) -> set[int]:
        return {worker.pid for worker in self.cluster.workers}

    def kill_worker_of(self, pid: int, parent: int) -> None:
        worker = self.cluster.worker_of(pid)  # no nanny: the worker runs the call itself
        os.kill(pid, signal.SIGKILL)
        worker.wait(30)

    def pending(self, execution_id: str) -> int:
        """The run's tasks the scheduler still holds."""
        return len(self.cluster.wanted_by(f"dm-{execution_id}-"))

    def forgotten(self, execution_id: str) -> int:
        """The run's tasks the scheduler holds for fire-and-forget (they go on without any client)."""
        return sum("fire-and-forget" in wanted for wanted in self.cluster.wanted_by(f"dm-{execution_id}-").values())

    def drivers_following(self, execution_id: str) -> set[int]:
        """For each task of the run the scheduler holds, how many clients want it besides fire-and-forget."""
        return {len(wanted - {"fire-and-forget"}) for wanted in self.cluster.wanted_by(f"dm-{execution_id}-").values()}

    def close(self) -> None:
        from durable_monty_nb.executors.dask import close_clients

        close_clients()
        self.cluster.close()


Remote = OnRQ | OnDask


@pytest.fixture(scope="module", params=[OnRQ, OnDask], ids=["rq", "dask"])
def remote(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    found = request.param(tmp_path_factory.mktemp(request.param.name))
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def engine(remote: Remote, sqlite_url: str) -> Iterator[Engine]:
    remote.ready()
    found = Engine(sqlite_url, executor=create_backend(remote.name, remote.settings))
    yield found
    for run in found.active_runs():
        run.cancel()
        run.wait(30)
    found.close()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """The file gated calls wait for; created at the end, so a failed test leaves no call hung."""
    found = tmp_path / "gate"
    yield found
    found.touch()


def entries(log: Path) -> list[tuple[int, int, str]]:
    """The log of :func:`gated_call`: (pid, parent pid, what) per line."""
    if not log.exists():
        return []
    return [
        (int(pid), int(parent), rest)
        for pid, parent, rest in (line.split(" ", 2) for line in log.read_text().splitlines())
    ]


def gated_call(log: Path, gate: Path) -> Any:
    """A notebook-style function (a closure: workers cannot import it) that logs its process and
    start, then holds until the file ``gate`` (or ``gate``-``i``, for this call alone) exists."""

    def gated(i: int) -> int:
        import os
        import time

        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {os.getppid()} gated {i}\n")
        while not (os.path.exists(gate) or os.path.exists(f"{gate}-{i}")):
            time.sleep(0.01)
        return i * 10

    return gated


def test_gather_and_sequential_calls_of_closures_shipped_by_value(engine: Engine, remote: Remote) -> None:
    offset = 7

    def shifted(x: int) -> list[Any]:
        import importlib.util
        import os

        return [x + offset, os.getpid(), importlib.util.find_spec("test_remote_scenarios") is None]

    code = "results = await gather(*[shifted(i) for i in range(n)])\nresults"
    run = engine.start(code, {"shifted": shifted, "n": 50})
    results = run.result(timeout=60)
    assert [r[0] for r in results] == [i + 7 for i in range(50)]
    assert all(r[2] for r in results)  # not importable there: the closure travelled by value
    assert os.getpid() not in {r[1] for r in results}
    calls = engine.store.load_calls(run.execution_id)
    assert {c.status for c in calls} == {"done"} and all(remote.worker_name.fullmatch(c.worker) for c in calls)
    ids = [attempt_id(run.execution_id, c.call_id, 1) for c in calls]
    attempts = engine.store.load_attempts(ids)
    assert len(attempts) == 50 and {a.executor for a in attempts.values()} == {remote.name}
    # The workers write outcomes (on Dask behind, batched): they all reach the store, signed, for re-attach.
    finished = wait_until(
        lambda: (found := engine.store.load_attempts(ids)) and all(a.finished for a in found.values()) and found,
        what="the workers to store every outcome",
    )
    assert {a.status for a in finished.values()} == {"done"}

    def double(x: int) -> int:
        return x * 2

    async def increment(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    code = "a = await double(20)\nb = await increment(a)\nb"
    assert engine.run(code, {"double": double, "increment": increment}, key="sequential") == 41


def test_results_failures_with_remote_tracebacks_and_retries(engine: Engine, tmp_path: Path) -> None:
    marker = tmp_path / "flaky-tries"

    @retry(retries=3, backoff="constant", delay=0.05)
    def flaky(x: int) -> int:
        with open(marker, "a") as handle:
            handle.write("x")
        if len(marker.read_text()) <= 2:
            raise ConnectionError("try again")
        return x

    def lookup(x: int) -> int:
        if x > 0:
            raise KeyError(f"no such item {x}")
        return x

    run = engine.start("await flaky(7)", {"flaky": flaky}, key="flaky")
    assert run.result(timeout=60) == 7
    assert marker.read_text() == "xxx"  # two failed attempts on workers, the third succeeded
    (call,) = engine.store.load_calls(run.execution_id)
    assert call.status == "done" and call.attempts == 3

    code = "try:\n    await lookup(1)\nexcept KeyError as e:\n    caught = str(e)\ncaught"
    assert "no such item 1" in engine.run(code, {"lookup": lookup}, key="caught")

    with pytest.raises(WorkflowFailed) as failure:
        engine.run("await lookup(0)\nawait lookup(2)", {"lookup": lookup}, key="uncaught")
    text = str(failure.value)
    assert "KeyError: 'no such item 2'" in text
    # the worker's frame of the function, with this file and its source line (whatever cloudpickle names it)
    assert re.search(rf'File "{re.escape(__file__)}", line \d+, in lookup\n\s+raise KeyError\(f"no such', text), text


def test_a_call_whose_worker_is_killed_runs_again_on_another_worker(
    engine: Engine, remote: Remote, tmp_path: Path, gate: Path
) -> None:
    log = tmp_path / "side.log"
    run = engine.start("await gated(4)", {"gated": gated_call(log, gate)}, key="lost")
    wait_until(lambda: entries(log), what="the call to start")
    wait_until(lambda: run.progress.running == 1 and run.calls()[0].worker, what="the call to show as running")
    ((victim, parent, _),) = entries(log)
    remote.kill_worker_of(victim, parent)  # the worker dies mid-call, and the call with it
    wait_until(lambda: len(entries(log)) == 2, what="the call to run again")  # RQ: once its liveness key expired
    gate.touch()
    assert run.result(timeout=120) == 40
    (first, _, _), (second, second_parent, _) = entries(log)  # once more, not more
    assert first == victim and second != victim
    assert {second, second_parent} & remote.pids()  # on a worker of ours (or the work horse of one)


def test_timed_out_calls_are_cancelled_on_the_workers(
    engine: Engine, remote: Remote, tmp_path: Path, gate: Path
) -> None:
    """A call hangs on each worker and one more waits behind them: at each one's deadline it
    raises TimeoutError in the workflow and its job is cancelled. On RQ a hung job is stopped
    mid-call (its worker free for the next, the gate still shut); on Dask the running ones hold
    their workers until they end and the queued one is cancelled before it ever runs."""
    log = tmp_path / "side.log"
    gated = limits(timeout=1)(gated_call(log, gate))
    code = (
        "async def one(i):\n    try:\n        return await gated(i)\n    except TimeoutError as e:\n"
        f"        return str(e)\nawait gather(*[one(i) for i in range({WORKERS + 1})])"
    )
    run = engine.start(code, {"gated": gated}, key="timeout")
    assert all("gated() did not finish within 1 s" in r for r in run.result(60))
    if remote.stops_hung_calls:
        # With the gate still shut, the workers are free: the hung jobs were stopped.
        def quick(x: int) -> int:
            return x + 1

        assert engine.run("await quick(1)", {"quick": quick}, key="after") == 2
        started = WORKERS + 1  # the third ran on a freed worker; each stopped mid-call, none run again
    else:
        started = WORKERS  # two were running; the third never started
    assert len(entries(log)) == started
    gate.touch()  # anything still running ends on its worker; its result is dropped
    wait_until(lambda: not remote.pending(run.execution_id), what="the service to forget the calls")
    assert len(entries(log)) == started


DRIVER = """
import json, os, sys
from durable_monty_nb import Engine
from durable_monty_nb.executors import create_backend

url, name, settings, mode = sys.argv[1:5]
log, gate = os.environ["SIDE_LOG"], os.environ["GATE"]


def gated(i):  # of __main__, as a notebook cell's: the workers get it by value
    import os, time

    with open(log, "a") as handle:
        handle.write(f"{os.getpid()} {os.getppid()} gated {i}\\n")
    while not (os.path.exists(gate) or os.path.exists(f"{gate}-{i}")):
        time.sleep(0.01)
    return i * 10


engine = Engine(url, executor=create_backend(name, json.loads(settings)), lease_ttl=5.0)
namespace = {"gated": gated, "n": 12}
code = "results = await gather(*[gated(i) for i in range(n)])\\nsum(results)"
run = engine.resume("killed", namespace) if mode == "resume" else engine.start(code, namespace, key="killed")
print("RESULT", run.result(), flush=True)
"""


@pytest.fixture
def drivers() -> Iterator[list[subprocess.Popen[str]]]:
    """Driver processes of a test, killed at its end if still running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill(proc)


def test_a_killed_driver_reattaches_to_calls_queued_running_and_finished_on_workers(
    remote: Remote, sqlite_url: str, tmp_path: Path, gate: Path, drivers: list[subprocess.Popen[str]]
) -> None:
    """The driver dies with 12 calls dispatched, 2 running: they go on without it, 4 finish, then
    a new driver resumes and follows the finished, running and queued ones; none runs twice."""
    log = tmp_path / "side.log"
    remote.ready()
    env = {**os.environ, "SIDE_LOG": str(log), "GATE": str(gate)}
    args = [sys.executable, "-c", DRIVER, sqlite_url, remote.name, json.dumps(remote.settings)]
    first = subprocess.Popen([*args, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    drivers.append(first)
    db = sqlite_url.removeprefix("sqlite:///")

    def dispatched() -> int:
        try:
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT count(*) FROM dm_attempts").fetchone()[0]
        except sqlite3.Error:
            return 0

    # All 12 attempts journaled and dispatched, two of them running on the workers: kill the driver.
    wait_until(lambda: dispatched() == 12 and len(entries(log)) == 2, what="2 calls running", procs=(first,))
    store = Store(sqlite_url)
    execution_id = store.latest_execution("killed").id
    if remote.drivers_following(execution_id) is not None:  # Dask: all 12 go on without the driver
        wait_until(lambda: remote.forgotten(execution_id) == 12, what="12 tasks fire-and-forget", procs=(first,))
    kill(first)
    if remote.drivers_following(execution_id) is not None:
        wait_until(lambda: remote.drivers_following(execution_id) == {0}, what="no driver following the tasks")
    assert remote.pending(execution_id) == 12  # all go on without a driver

    # The workers go on: the running calls finish while the driver is dead, two more start, and so on.
    for started in (4, 6):
        for _, _, entry in entries(log):
            Path(f"{gate}-{entry.split()[1]}").touch()
        wait_until(lambda n=started: len(entries(log)) == n, what=f"{started} calls started while the driver is dead")
    wait_until(lambda: remote.pending(execution_id) == 8, what="4 calls finished, 2 running, 6 queued")

    second = subprocess.Popen([*args, "resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    drivers.append(second)
    if remote.drivers_following(execution_id) is not None:
        wait_until(
            lambda: remote.drivers_following(execution_id) == {1},
            what="the new driver to follow the 8 tasks",
            procs=(second,),
        )
    gate.touch()
    code, out, err = finish(second)
    assert code == 0, err
    assert "RESULT 660" in out
    found = entries(log)
    assert sorted(entry for _, _, entry in found) == sorted(f"gated {i}" for i in range(12))  # none ran twice
    assert all({pid, parent} & remote.pids() for pid, parent, _ in found)  # on our workers (or their horses)
    row = store.latest_execution("killed")
    assert row.status == "completed" and row.calls_done == 12
    calls = store.load_calls(execution_id)
    assert len(calls) == 12 and {call.attempts for call in calls} == {1}  # none was dispatched again
    assert len(store.load_attempts([attempt_id(execution_id, call.call_id, 1) for call in calls])) == 12
    store.close()
