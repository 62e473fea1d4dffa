"""The dask executor on a real cluster: a ``dask scheduler`` and two ``dask worker`` processes.

The workers are plain ``dask worker`` processes that cannot import the tests: every notebook
function reaches them by value (cloudpickle), as functions of notebook cells do. They sign
outcomes with the key conftest puts in the environment, which they inherit. The scenarios Dask
shares with the other remote executors are in test_remote_scenarios.py; these are Dask's own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ci import require_module
from procs import finish, free_port, kill, log_entries, wait_until

from durable_monty_nb import Engine, WorkflowFailed
from durable_monty_nb.errors import ExecutorUnavailable
from durable_monty_nb.executors.dask import ADDRESS_ENV, Dask, close_clients

require_module("distributed", extra="dask")  # in CI a missing extra fails, never skips

TESTS = Path(__file__).resolve().parent
DASK = str(Path(sys.executable).parent / "dask")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of workers: this one (the signing key too) without the tests on the path,
    then ``extra``."""
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != TESTS]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **(extra or {})}


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def dask_process(directory: Path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``dask scheduler`` on 127.0.0.1:PORT, or a single-threaded ``dask worker`` (no nanny) of ADDRESS."""
    if args[0] == "scheduler":
        args = (*args[:1], "--host", "127.0.0.1", "--port", *args[1:], "--no-dashboard", "--dashboard-address", ":0")
    else:
        args = (*args, "--nthreads", "1", "--nworkers", "1", "--no-nanny", "--no-dashboard")
    with open(directory / f"{name}.log", "ab") as log:
        return subprocess.Popen([DASK, *args], stdout=log, stderr=subprocess.STDOUT, env=worker_env(env), cwd=directory)


class Cluster:
    """A scheduler and two single-threaded workers, each a process of its own (no nanny); ``env``
    adds to the workers' environment (e.g. the tests on their PYTHONPATH)."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        from distributed import Client

        self.directory = directory
        self.env = env
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.scheduler = dask_process(directory, "scheduler", "scheduler", str(port))
        self.workers: list[subprocess.Popen[bytes]] = []
        self.workers = [self.start_worker() for _ in range(2)]
        try:
            self.client = Client(self.address, timeout=30, set_as_default=False)
            self.ready()
            # A precondition of the harness, not a test of the product: the workers sign with the tests' key.
            keys = self.client.run(lambda: os.environ.get("DURABLE_MONTY_KEY"))
            assert list(keys.values()) == [os.environ["DURABLE_MONTY_KEY"]] * 2, "the workers lack the signing key"
        except BaseException:
            self.kill()
            raise

    def start_worker(self) -> subprocess.Popen[bytes]:
        return dask_process(self.directory, f"worker-{len(self.workers)}", "worker", self.address, env=self.env)

    def ready(self) -> None:
        """Two live workers (a killed one is replaced)."""
        for i, worker in enumerate(self.workers):
            if worker.poll() is not None:
                self.workers[i] = self.start_worker()
        wait_until(lambda: len(self.client.scheduler_info(n_workers=-1)["workers"]) == 2, what="two dask workers")

    def worker_of(self, pid: int) -> subprocess.Popen[bytes]:
        (worker,) = [w for w in self.workers if w.pid == pid]
        return worker

    def wanted_by(self, prefix: str) -> dict[str, set[str]]:
        """The tasks whose key starts with ``prefix`` and the clients that want them."""

        def clients(dask_scheduler: Any, prefix: str) -> dict[str, set[str]]:
            return {
                key: {cs.client_key for cs in ts.who_wants or ()}
                for key, ts in dask_scheduler.tasks.items()
                if str(key).startswith(prefix)
            }

        return self.client.run_on_scheduler(clients, prefix=prefix)

    def close(self) -> None:
        self.client.close()
        self.kill()

    def kill(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("dask"))
    yield cluster
    close_clients()
    cluster.close()


@pytest.fixture
def dask_engine(cluster: Cluster, sqlite_url: str) -> Iterator[Engine]:
    cluster.ready()
    engine = Engine(sqlite_url, executor=Dask(cluster.address))
    yield engine
    for run in engine.active_runs():
        run.cancel()
        run.wait(30)
    engine.close()


def gated_call(log: Path, gate: Path) -> Any:
    """A notebook-style function (a closure: workers cannot import it) that logs its start,
    then holds until the file ``gate`` exists."""

    def gated(i: int) -> int:
        import os
        import time

        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} gated {i}\n")
        while not os.path.exists(gate):
            time.sleep(0.01)
        return i * 10

    return gated


def test_scheduler_restart_runs_lost_calls_again(sqlite_url: str, tmp_path: Path) -> None:
    # ~10 s: a scheduler of its own started twice, two workers, and the grace before "no worker".
    log, gate = tmp_path / "side.log", tmp_path / "gate"
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        dask_process(tmp_path, "scheduler", "scheduler", str(port)),
        dask_process(tmp_path, "w1", "worker", address),
    ]

    gated = gated_call(log, gate)
    wait_until(lambda: listening(port), what="the scheduler to listen", procs=tuple(procs))  # slow on a busy machine
    engine = Engine(sqlite_url, executor=Dask(address))
    try:
        run = engine.start("await gated(3)", {"gated": gated})
        wait_until(lambda: log_entries(log), what="the call to start")
        procs[0].kill()  # its workers stop with it (dask workers do not outlive their scheduler)
        procs[0].wait(30)
        wait_until(lambda: f"cannot reach the Dask scheduler at {address} since" in (run.progress.note or ""))
        procs.append(dask_process(tmp_path, "scheduler-2", "scheduler", str(port)))
        wait_until(lambda: f"no Dask worker is connected to {address}" in (run.progress.note or ""), what="no worker")
        procs.append(dask_process(tmp_path, "w2", "worker", address))
        wait_until(lambda: len(log_entries(log)) == 2, what="the lost call to run again")
        gate.touch()
        assert run.result(timeout=60) == 30
        (call,) = engine.store.load_calls(run.execution_id)
        assert call.status == "done" and call.attempts == 2  # attempt 1 was lost with the scheduler
    finally:
        engine.close()
        for proc in procs:
            proc.kill()
            proc.wait(30)


def test_worker_with_another_key_refuses_the_task(cluster: Cluster, sqlite_url: str) -> None:
    cluster.ready()

    def double(x: int) -> int:
        return x * 2

    engine = Engine(sqlite_url, executor=Dask(cluster.address), secret="not-the-workers-key")
    try:
        with pytest.raises(WorkflowFailed) as info:
            engine.run("await double(2)", {"double": double})
    finally:
        engine.close()
    text = str(info.value)
    assert "TamperedDataError" in text and "its signature does not match this worker's key" in text
    assert "DURABLE_MONTY_KEY" in text


def test_unreachable_scheduler_is_reported_before_anything_runs(sqlite_url: str) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ExecutorUnavailable) as info:
        Engine(sqlite_url, executor=Dask(address)).run("await f(1)", {"f": abs})
    text = str(info.value)
    assert address in text and "dask scheduler" in text and "nothing was dispatched" in text


def test_local_cluster_without_an_address(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Starts a LocalCluster of os.cpu_count() worker processes (a few seconds), closed at the end.
    monkeypatch.delenv(ADDRESS_ENV, raising=False)

    def cube(x: int) -> int:
        return x**3

    engine = Engine(sqlite_url, executor="dask")
    try:
        code = "results = await gather(*[cube(i) for i in range(n)])\nsum(results)"
        assert engine.run(code, {"cube": cube, "n": 10}) == 2025
        assert engine.run(code, {"cube": cube, "n": 11}, key="again") == 3025  # the same cluster
        err = capfd.readouterr().err
        assert err.count("started a local Dask cluster") == 1 and "DurableMagics.dask_address" in err
    finally:
        engine.close()
        close_clients()


def test_large_arguments_travel_by_the_store_never_through_the_scheduler(
    dask_engine: Engine, cluster: Cluster, tmp_path: Path
) -> None:
    """Over 64 KB of arguments reach the worker through the store's blobs: the task the
    scheduler holds carries only the blob's key (measured while the task runs, held by a gate)."""
    gate = tmp_path / "gate"

    def held(value: str, gate: str) -> int:
        import os
        import time

        while not os.path.exists(gate):
            time.sleep(0.01)
        return len(value)

    big = os.urandom(50_000).hex()  # 100 KB
    run = dask_engine.start("await held(big, gate)", {"held": held, "big": big, "gate": str(gate)}, key="big-args")
    prefix = f"dm-{run.execution_id}-"

    def spec_sizes(dask_scheduler: Any, prefix: str) -> dict[str, int]:
        import pickle

        return {
            str(key): len(pickle.dumps(ts.run_spec))
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith(prefix) and ts.run_spec is not None
        }

    sizes = wait_until(lambda: cluster.client.run_on_scheduler(spec_sizes, prefix=prefix), what="the task")
    gate.touch()
    assert run.result(60) == 100_000
    (size,) = sizes.values()
    assert size < 8_000, size  # the key of a blob, not 100 KB of arguments
    (call,) = dask_engine.store.load_calls(run.execution_id)
    assert len(call.args) > 100_000  # the arguments themselves are in the store


def test_cancel_withdraws_queued_tasks_on_dask_workers(cluster: Cluster, dask_engine: Engine, tmp_path: Path) -> None:
    """As on threads and RQ: the queued calls are released on the scheduler (none starts), the two
    running ones finish and are kept, the run ends interrupted; a resume runs only the rest."""
    from test_cancel import GATHER, gated_function, started

    from durable_monty_nb.executors.base import attempt_id

    log, gate = tmp_path / "started.log", tmp_path / "gate"
    ns = {"gated": gated_function(), "log": str(log), "gate": str(gate), "n": 40}
    run = dask_engine.start(GATHER, ns, key="dask-fanout")
    prefix = f"dm-{run.execution_id}-"
    wait_until(lambda: len(started(log)) == 2, what="2 calls running on the 2 workers", timeout=60)
    assert len(cluster.wanted_by(prefix)) == 40  # every call submitted: 38 wait on the scheduler

    run.cancel()
    assert run.wait(30) and run.status == "interrupted"
    wait_until(lambda: len(cluster.wanted_by(prefix)) == 2, what="the 38 queued tasks released")
    gate.touch()
    attempts = [attempt_id(run.execution_id, call.call_id, 1) for call in run.calls()]
    wait_until(
        lambda: sum(record.finished for record in dask_engine.store.load_attempts(attempts).values()) == 2,
        what="the two running calls finished, their outcomes in the store",
    )
    assert len(started(log)) == 2  # no queued call started

    again = dask_engine.resume("dask-fanout", ns)
    assert again.result(120) == sum(i * 10 for i in range(40))
    assert sorted(started(log)) == list(range(40))  # the rest ran once, the first two were kept


def test_calls_that_finished_while_no_driver_listened_run_once_though_their_workers_still_held_the_outcomes(
    own_dask_cluster: Cluster, sqlite_url: str, tmp_path: Path
) -> None:
    """A worker commits the outcomes of its tasks in batches, a while after each task ends (here it
    would hold them ten minutes). The driver dies with 12 calls dispatched, 2 running; all 12 finish
    while it is dead and the scheduler forgets them, their outcomes not yet in the store. A new
    driver has the workers commit what they hold before it runs anything again: none runs twice."""
    from test_remote_scenarios import DRIVER, entries

    from durable_monty_nb.executors.base import attempt_id
    from durable_monty_nb.store.store import Store

    def linger(seconds: float) -> None:  # a closure: it reaches the workers by value
        from durable_monty_nb.executors import worker

        worker.WRITE_LINGER = seconds

    cluster = own_dask_cluster
    cluster.client.run(linger, 600.0)
    log, gate = tmp_path / "side.log", tmp_path / "gate"
    env = {**os.environ, "SIDE_LOG": str(log), "GATE": str(gate)}
    args = [sys.executable, "-c", DRIVER, sqlite_url, "dask", json.dumps({"address": cluster.address})]
    first = subprocess.Popen([*args, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(entries(log)) == 2, what="2 calls running", procs=(first,))
        store = Store(sqlite_url)
        execution_id = store.latest_execution("killed").id
        prefix = f"dm-{execution_id}-"
        wait_until(
            lambda: sum("fire-and-forget" in w for w in cluster.wanted_by(prefix).values()) == 12,
            what="12 tasks fire-and-forget",
            procs=(first,),
        )
    finally:
        kill(first)
    gate.touch()  # the calls finish while no driver listens; the scheduler forgets them
    wait_until(lambda: len(entries(log)) == 12 and not cluster.wanted_by(prefix), what="12 tasks run and forgotten")
    ids = [attempt_id(execution_id, call.call_id, 1) for call in store.load_calls(execution_id)]
    assert len(ids) == 12 and not any(record.finished for record in store.load_attempts(ids).values())

    second = subprocess.Popen([*args, "resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = finish(second)
    assert code == 0, err
    assert "RESULT 660" in out
    assert sorted(entry for _, _, entry in entries(log)) == sorted(f"gated {i}" for i in range(12))  # none ran twice
    assert {call.attempts for call in store.load_calls(execution_id)} == {1}
    assert all(record.finished for record in store.load_attempts(ids).values())
    store.close()
