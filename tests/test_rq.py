"""The rq executor with real Redis and real worker processes (started and killed here).

Redis comes from DURABLE_TEST_REDIS_URL (default: database 11 of the local server), flushed
before each test. Workers get the tests' signing key from the environment and import the
test modules through PYTHONPATH only where a test says so: notebook-style functions (defined
in a test) reach them by value. The scenarios RQ shares with the other remote executors are in
test_remote_scenarios.py; these are RQ's own.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import wait_until

from durable_monty_nb import Engine, ExecutionInterrupted, WorkflowFailed
from durable_monty_nb.errors import ExecutorUnavailable, ValueCrossingError
from durable_monty_nb.executors.rq import RQ

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
VENV_BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent


class Workers:
    """RQ worker processes on one queue, each in its own process group (so a kill takes its job too)."""

    def __init__(self, url: str, queue: str, env: dict[str, str]) -> None:
        # A queue of this run alone: a worker another run left behind (with another signing key)
        # on a queue of the same name would take its jobs.
        self.url, self.queue, self.env = url, f"{queue}-{uuid.uuid4().hex[:8]}", env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.plain: dict[int, bool] = {}  # by pid: a plain `rq worker` or `durable-monty-nb worker`

    def start(self, count: int = 1, *, plain: bool = False, preload: tuple[str, ...] = ()) -> None:
        for _ in range(count):
            command = [str(VENV_BIN / "rq"), "worker"] if plain else [str(VENV_BIN / "durable-monty-nb"), "worker"]
            command += [f"--preload={module}" for module in preload]
            proc = subprocess.Popen(
                [*command, self.queue, "--url", self.url],
                env={**os.environ, **self.env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.procs.append(proc)
            self.plain[proc.pid] = plain

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(redis_url, f"q-{tmp_path.name[-20:]}", {"PYTHONPATH": str(TESTS)})
    yield pool
    pool.stop()


def log_lines(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    return [(int(pid), rest) for pid, rest in (line.split(" ", 1) for line in log.read_text().splitlines())]


def recorder(log: Path) -> Any:
    """A notebook-style function (it reaches the workers by value) that logs its process and argument."""

    def record(i):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {i}\n")
        return i

    return record


def test_a_gather_a_sync_call_and_notebook_functions_on_plain_rq_workers(
    workers: Workers, sqlite_url: str, tmp_path: Path
) -> None:
    workers.start(1, plain=True)  # a plain `rq worker`: nothing but the package and the key
    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
    scale = 3

    def triple(x):  # defined here, as in a notebook cell: workers cannot import it, it travels by value
        return {"value": x * scale, "pid": os.getpid()}

    code = (
        "rs = await gather(*[triple(i) for i in range(4)])\none = triple(10)\n[r['value'] for r in rs] + [one['value']]"
    )
    run = engine.start(code, {"triple": triple}, key="plain")
    assert run.result(120) == [0, 3, 6, 9, 30]
    calls = sorted(run.calls(), key=lambda call: call.call_id)
    assert {call.status for call in calls} == {"done"}
    # The call list says where each call ran: the worker's name and the process (its work horse)
    # that the function itself saw, never this process.
    ran_in = [r["pid"] for r in [*run.outputs["rs"], run.outputs["one"]]]  # in call order
    assert os.getpid() not in ran_in
    assert [call.worker.rsplit(":", 1)[-1] for call in calls] == [str(pid) for pid in ran_in]
    engine.close()


def test_two_workers_never_run_one_call_twice(workers: Workers, sqlite_url: str, tmp_path: Path) -> None:
    # Workers told the store (as a user does) open it before forking; every job inherits it warm.
    workers.env["DURABLE_MONTY_DB"] = sqlite_url
    workers.start(2)
    log = tmp_path / "side.log"
    record = recorder(log)
    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
    assert engine.run("sum(await gather(*[record(i) for i in range(40)]))", {"record": record}, key="two") == 780
    entries = log_lines(log)
    assert sorted(int(i) for _, i in entries) == list(range(40))  # each call exactly once
    engine.close()


def test_a_module_missing_on_the_workers_reaches_the_cell_and_only_failed_calls_run_again(
    workers: Workers, sqlite_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "side.log"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "dm_encoder_plugin.py").write_text("def encode(x):\n    return x * 100\n")

    def prepare(i):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} prepare {i}\n")
        return i

    def encode(x):
        import dm_encoder_plugin  # installed on the fixed workers only

        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} encode {x}\n")
        return dm_encoder_plugin.encode(x)

    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
    ns = {"prepare": prepare, "encode": encode}
    code = "xs = [await prepare(i) for i in range(3)]\nsum(await gather(*[encode(x) for x in xs]))"
    workers.start(1)
    with pytest.raises(WorkflowFailed) as failure:
        engine.run(code, ns, key="plugin")
    text = str(failure.value)
    assert "ModuleNotFoundError: No module named 'dm_encoder_plugin'" in text
    assert "import dm_encoder_plugin" in text  # the worker's traceback
    assert "Install it in the workers' environment" in text and "Monty sandbox" not in text
    workers.stop()

    workers.env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(modules)])  # fix the workers
    workers.start(1)
    assert engine.run(code, ns, key="plugin") == 300
    entries = [entry for _, entry in log_lines(log)]
    assert sorted(e for e in entries if e.startswith("prepare")) == ["prepare 0", "prepare 1", "prepare 2"]
    assert sorted(e for e in entries if e.startswith("encode")) == ["encode 0", "encode 1", "encode 2"]
    engine.close()


def test_a_call_the_failed_run_left_running_that_fails_too_runs_again_with_the_failed_calls(
    workers: Workers, sqlite_url: str, tmp_path: Path
) -> None:
    """The cell fails on its first failed call while others still run on the unfixed workers;
    they fail a moment later. Run again after the fix, those are failed calls too: they run."""
    log, gate = tmp_path / "side.log", tmp_path / "gate"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "dm_encoder_plugin.py").write_text("def encode(x):\n    return x * 100\n")

    def encode(x):
        if x == 1:
            with open(log, "a") as handle:
                handle.write(f"{os.getpid()} started {x}\n")
            while not gate.exists():  # still running on the unfixed worker when the cell fails
                time.sleep(0.01)
        import dm_encoder_plugin  # installed on the fixed worker only

        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} encode {x}\n")
        return dm_encoder_plugin.encode(x)

    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
    code = "sum(await gather(*[encode(x) for x in [0, 1]]))"
    workers.start(1)
    unfixed = workers.procs[0]
    with pytest.raises(WorkflowFailed, match=r"call 0, encode\(0\)"):
        engine.run(code, {"encode": encode}, key="plugin")
    wait_until(lambda: "started 1" in [e for _, e in log_lines(log)], what="encode(1) running")
    unfixed.send_signal(signal.SIGTERM)  # RQ's warm shutdown: it ends the job it runs, then leaves
    gate.touch()
    assert unfixed.wait(30) == 0  # encode(1) failed there, after the cell's failure

    workers.env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(modules)])  # fix the workers
    workers.start(1)
    assert engine.run(code, {"encode": encode}, key="plugin") == 100
    ran = [entry for _, entry in log_lines(log) if entry.startswith("encode")]
    assert sorted(ran) == ["encode 0", "encode 1"]
    engine.close()


def test_a_worker_told_to_stop_leaves_though_its_listener_read_the_unsubscribe_first(redis_url: str) -> None:
    """The order that made a warm shutdown of rq 3 wait a minute (with redis-py 8.2): the command
    listener reads the reply to the worker's UNSUBSCRIBE, then starts another wait before it is
    told to stop. `durable-monty-nb worker`'s listener wakes every second and sees the stop."""
    from redis import Redis

    from durable_monty_nb.executors.rq_worker import DurableWorker

    worker = DurableWorker([f"q-listener-{uuid.uuid4().hex[:8]}"], connection=Redis.from_url(redis_url))
    worker.subscribe()
    wait_until(lambda: worker.pubsub.subscribed, what="the listener subscribed")
    worker.pubsub.unsubscribe()
    wait_until(lambda: not worker.pubsub.subscribed, what="the listener read the unsubscribe reply")
    stopping = threading.Thread(target=worker.unsubscribe, daemon=True)  # what a warm shutdown runs
    stopping.start()
    stopping.join(20)
    assert not stopping.is_alive(), "the worker's shutdown waits for its command listener"


def test_a_preloaded_module_is_imported_once_by_the_worker_not_in_every_job(
    workers: Workers, sqlite_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "imports.log"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "dm_heavy_lib.py").write_text(
        "import os\n"
        f"with open({str(log)!r}, 'a') as handle:\n"
        "    handle.write(f'{os.getpid()}\\n')\n"
        "def scale(x):\n    return x * 3\n"
    )

    def use(x):
        import dm_heavy_lib

        return os.getpid(), dm_heavy_lib.scale(x)

    workers.env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(modules)])
    workers.start(1, preload=("dm_heavy_lib",))
    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
    done = engine.run("[await use(i) for i in range(3)]", {"use": use}, key="preloaded")
    assert [value for _, value in done] == [0, 3, 6]
    horses = {pid for pid, _ in done}
    assert len(horses) == 3  # every job ran in a work horse of its own (RQ forks one per job)...
    imported = log.read_text().split()
    assert imported == [str(workers.procs[0].pid)]  # ...and found the module imported by the worker once
    engine.close()

    bad = subprocess.run(
        [str(VENV_BIN / "durable-monty-nb"), "worker", workers.queue, "--url", workers.url, "--preload", "dm_no_such"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "cannot preload 'dm_no_such': No module named 'dm_no_such'" in bad.stderr


def test_queued_jobs_lost_with_a_flushed_redis_run_again(workers: Workers, sqlite_url: str, tmp_path: Path) -> None:
    from redis import Redis

    log = tmp_path / "side.log"
    record = recorder(log)
    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
    run = engine.start("sum(await gather(*[record(i) for i in range(6)]))", {"record": record}, key="flushed")
    redis = Redis.from_url(workers.url)
    wait_until(lambda: redis.llen(f"rq:queue:{workers.queue}") == 6, what="6 jobs queued, no worker yet")
    redis.flushdb()  # the queue and its jobs are gone
    wait_until(lambda: redis.llen(f"rq:queue:{workers.queue}") == 6, what="the lost jobs enqueued again")
    workers.start(1)
    assert run.result(120) == 15
    assert sorted(int(entry) for _, entry in log_lines(log)) == list(range(6))  # each call once
    assert {call.attempts for call in run.calls()} == {2}  # the lost attempt, then the one that ran
    engine.close()


def test_jobs_whose_worker_died_before_running_them_run_again(
    workers: Workers, sqlite_url: str, tmp_path: Path
) -> None:
    """A worker killed between RQ's dequeue and its work horse running the job leaves the job
    ``queued`` in RQ's intermediate list, or ``started`` with no work horse: each such call runs
    again on another worker, once, instead of the run waiting forever."""
    from redis import Redis
    from rq import Queue, Worker

    log = tmp_path / "side.log"
    record = recorder(log)
    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
    run = engine.start("sum(await gather(*[record(i) for i in range(4)]))", {"record": record}, key="orphan")
    redis = Redis.from_url(workers.url)
    queue = Queue(workers.queue, connection=redis)
    wait_until(lambda: redis.llen(queue.key) == 4, what="4 jobs queued, no worker yet")
    # What a real worker does first, with RQ's own code, and then nothing more: it "dies" after
    # taking one job, and after marking another one started.
    Queue.dequeue_any([queue], None, connection=redis)
    started, _ = Queue.dequeue_any([queue], None, connection=redis)
    Worker([queue], connection=redis).prepare_job_execution(started)
    assert started.get_status() == "started" and redis.llen(queue.key) == 2
    workers.start(1)
    assert run.result(120) == 6
    assert sorted(int(entry) for _, entry in log_lines(log)) == [0, 1, 2, 3]  # each call once
    assert sorted(call.attempts for call in run.calls()) == [1, 1, 2, 2]  # the orphaned jobs' calls ran again
    engine.close()


def test_a_tampered_function_pickle_is_refused_by_the_worker(workers: Workers, sqlite_url: str) -> None:
    workers.start(1)
    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))

    def inc(x):
        return x + 1

    assert engine.run("await inc(1)", {"inc": inc}, key="tamper") == 2
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
        key, data = conn.execute("SELECT key, data FROM dm_functions").fetchone()
        conn.execute("UPDATE dm_functions SET data = ? WHERE key = ?", (data.replace(b"\x01", b"\x02", 1), key))
    with pytest.raises(WorkflowFailed) as failure:
        engine.run("await inc(2)", {"inc": inc}, key="tamper")  # new arguments: the call must run
    text = str(failure.value)
    assert "TamperedDataError" in text and "'inc'" in text and "integrity check" in text
    engine.close()


def test_unreachable_redis_and_unshippable_functions_fail_before_anything_runs(redis_url: str, sqlite_url: str) -> None:
    engine = Engine(sqlite_url)
    with pytest.raises(ExecutorUnavailable, match=re.escape(f"cannot reach Redis at {UNREACHABLE_REDIS}")):
        engine.start("await f(1)", {"f": abs}, key="down", executor=RQ(UNREACHABLE_REDIS))

    lock = threading.Lock()

    def guarded(x):
        with lock:
            return x

    with pytest.raises(ValueCrossingError, match="the function 'guarded' cannot be shipped to workers"):
        engine.start("await guarded(1)", {"guarded": guarded}, key="lock", executor=RQ(redis_url))
    assert engine.executions() == []  # nothing was stored, nothing was dispatched
    engine.close()


def test_nobody_listening_on_the_queue_is_said_not_silent(redis_url: str, sqlite_url: str) -> None:
    engine = Engine(sqlite_url, executor=RQ(redis_url, "nobody-listens"))
    run = engine.start("await f(1)", {"f": abs}, key="alone")
    note = wait_until(lambda: run.progress.note, what="a note about the empty queue", timeout=30)
    assert "no worker is listening on queue nobody-listens" in note and "rq worker nobody-listens" in note
    run.cancel()
    assert run.wait(30) and run.status == "interrupted"
    with pytest.raises(ExecutionInterrupted):
        run.result()
    engine.close()


def test_a_postgresql_store_shared_by_the_kernel_and_the_workers(workers: Workers, postgres_url: str) -> None:
    workers.env["DURABLE_MONTY_DB"] = postgres_url
    workers.start(2)
    engine = Engine(postgres_url, executor=RQ(workers.url, workers.queue))

    def square(x):
        return x * x

    assert engine.run("sum(await gather(*[square(i) for i in range(20)]))", {"square": square}, key="pg") == 2470
    engine.close()


def test_large_arguments_and_objects_travel_by_the_store_never_through_redis(workers: Workers, sqlite_url: str) -> None:
    """Over 64 KB of arguments, and any object (a DataFrame, however small), reach the worker
    through the store's blobs: the job in Redis holds only a reference."""
    import json

    import pandas as pd
    from redis import Redis
    from rq.job import Job

    workers.start(1)
    engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
    big = os.urandom(50_000).hex()  # 100 KB of text, which compression cannot shrink below 64 KB

    def measure(value):
        return len(value) if isinstance(value, str) else int(value["n"].sum())

    code = "await gather(measure(big), measure(small), measure(frame))"
    namespace = {"measure": measure, "big": big, "small": "tiny", "frame": pd.DataFrame({"n": [1, 2, 3]})}
    run = engine.start(code, namespace, key="by-store")
    assert run.result(120) == [100_000, 4, 6]
    redis = Redis.from_url(workers.url)
    jobs = {c.call_id: Job.fetch(f"dm-{run.execution_id}-{c.call_id}-1", connection=redis) for c in run.calls()}
    payloads = {call_id: job.args[0] for call_id, job in jobs.items()}
    stored = {c.call_id: c.args for c in engine.store.load_calls(run.execution_id)}
    with engine.store.engine.connect() as conn:
        blobs = {row[0] for row in conn.exec_driver_sql("SELECT key FROM dm_blobs")}
    big_call, small_call, frame_call = sorted(payloads)
    # Over 64 KB: the job carries the blob's key, not the arguments; the blob holds them.
    assert payloads[big_call]["args"] == "" and payloads[big_call]["args_blob"] in blobs
    assert all(len(redis.hget(f"rq:job:{job.id}", "data") or b"") < 4096 for job in jobs.values())
    assert big not in json.dumps(payloads[big_call])
    # Small arguments travel inline; an object travels as its handle, its pickle in the store.
    assert payloads[small_call]["args"] == stored[small_call] and not payloads[small_call]["args_blob"]
    handle = json.loads(payloads[frame_call]["args"])[0][0]
    assert set(handle) == {"$h", "t"} and handle["t"] == "pandas.DataFrame" and handle["$h"] in blobs
    engine.close()


def test_redis_lost_mid_run_is_shown_then_ridden_out(workers: Workers, sqlite_url: str, tmp_path: Path) -> None:
    """The kernel's connection to Redis goes away while a call runs on a worker: the widget says
    "cannot reach Redis ... since ..., retrying", the run waits, and continues when Redis is back;
    no call runs twice."""
    from proxy import Proxy
    from redis.connection import parse_url

    from durable_monty_nb.notebook.views import make_widget

    log, gate = tmp_path / "side.log", tmp_path / "gate"
    gate.touch()

    def step(i):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {i}\n")
        while i == 2 and gate.exists():  # held on the worker while the test cuts Redis off
            time.sleep(0.01)
        return i

    workers.start(1)  # the workers reach Redis directly; only the kernel's way goes through the proxy
    target = parse_url(workers.url)
    proxy = Proxy((target.get("host", "127.0.0.1"), int(target.get("port", 6379))))
    through = f"redis://127.0.0.1:{proxy.port}/{target.get('db', 0)}"
    engine = Engine(sqlite_url, executor=RQ(through, workers.queue))
    try:
        run = engine.start("t = 0\nfor i in range(5):\n    t += await step(i)\nt", {"step": step}, key="redis-lost")
        wait_until(lambda: len(log_lines(log)) == 3, what="call 2 to run on the worker")
        proxy.down()
        gate.unlink()  # call 2 finishes on the worker while the kernel cannot reach Redis
        note = wait_until(lambda: run.progress.note, what="the loss to be shown")
        assert note.startswith(f"cannot reach Redis at {through} since") and "retrying" in note, note
        widget = make_widget(run)
        widget.refresh()
        assert "cannot reach Redis" in widget._counts.value
        assert not run.done
        proxy.up()
        assert run.result(120) == 10
        assert sorted(int(i) for _, i in log_lines(log)) == [0, 1, 2, 3, 4]  # each call once
        assert run.progress.note is None
    finally:
        proxy.close()
        engine.close()
