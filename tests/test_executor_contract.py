"""The executor contract: what every registered executor promises the driver, checked on each.

One harness per executor gives a backend (made through the registry, as the magics and
``Engine`` make it), a fresh run on a store both sides reach, and tasks built the way the
driver builds them (the live callable for in-process executors; the function shipped to the
store and the arguments in its codec for remote ones). The scenarios then hold every
executor to the same promises:

- each submitted task reports one outcome, with its value;
- a failure carries the exception's names, message and the traceback of where it was raised,
  and a ``RetryAfter``'s delay as a number;
- ``withdraw`` (when an executor has it) takes back queued tasks, which never run, and only those;
- ``durable`` is honest: a durable executor's attempts outlive the executor object that
  dispatched them and another one attaches to them by id (an attempt it cannot follow is
  returned lost, with its outcome in the store when it had finished); a non-durable one
  returns every attempt as lost;
- ``remote`` is honest: remote tasks run in another process from their data alone, in-process
  ones in this process; ``counts()`` and ``problem`` say what is going on.

The executors: ``threads``, ``rq`` (one real ``durable-monty-nb worker`` process on Redis),
``dask`` (a real scheduler and two worker processes), and ``fake``, a small in-memory one
defined here for fast unit runs of the driver. Services start once per module. A new
registered executor must get a harness here (a test checks it).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ci import require_module
from procs import wait_until

from durable_monty_nb import RetryAfter
from durable_monty_nb.defaults import INLINE_LIMIT
from durable_monty_nb.executors import (
    RunContext,
    create_backend,
    executor_names,
    register_executor,
    unregister_executor,
)
from durable_monty_nb.executors.base import Done, LocalCall, Outcome, Task
from durable_monty_nb.executors.record import outcome_of
from durable_monty_nb.store.owners import new_owner
from durable_monty_nb.store.store import Step, Store
from durable_monty_nb.values import ValueCodec, blob_key, ship_function

# -- a fake executor: an in-memory service with one worker thread --------------------------------


class FakeService:
    """Stands for a queue service and its worker: attempts live here, not in the executor
    objects, so they outlive the one that submitted them (as jobs outlive a kernel on RQ).
    ``slots`` threads run queued tasks in order."""

    def __init__(self, slots: int = 1) -> None:
        self.lock = threading.Condition()
        self.queued: deque[str] = deque()
        self.tasks: dict[str, Task] = {}
        self.running: set[str] = set()
        self.finished: dict[str, Outcome] = {}
        self.listeners: dict[str, Done] = {}
        for i in range(slots):
            threading.Thread(target=self._work, daemon=True, name=f"fake-worker-{i}").start()

    def _work(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: bool(self.queued))
                task = self.tasks[self.queued.popleft()]
                self.running.add(task.id)
            call = task.local
            assert call is not None
            started = task.started_at = time.time()
            try:
                outcome = Outcome.of(task, started, value=call.context.run(call.fn, *call.args, **call.kwargs))
            except Exception as exc:
                outcome = Outcome.of(task, started, error=exc)
            with self.lock:
                self.running.discard(task.id)
                self.finished[task.id] = outcome
                done = self.listeners.pop(task.id, None)
            if done is not None:
                done(outcome)


SERVICE: FakeService | None = None


class FakeExecutor:
    """The executor of one run on the fake service (see :class:`FakeService`)."""

    name = "fake"
    remote = False
    durable = True  # the service holds the attempts, not this object
    problem = None

    def __init__(self, service: FakeService) -> None:
        self.service = service
        self.mine: set[str] = set()

    def submit(self, tasks: Sequence[Task], done: Done) -> None:
        with self.service.lock:
            for task in tasks:
                self.service.tasks[task.id] = task
                self.service.listeners[task.id] = done
                self.service.queued.append(task.id)
                self.mine.add(task.id)
            self.service.lock.notify_all()

    def attach(self, tasks: Sequence[Task], done: Done) -> list[Task]:
        lost, finished = [], []
        with self.service.lock:
            for task in tasks:
                if task.id in self.service.finished:
                    finished.append(self.service.finished[task.id])
                elif task.id in self.service.tasks:
                    self.service.listeners[task.id] = done
                    self.mine.add(task.id)
                else:
                    lost.append(task)
        for outcome in finished:
            done(outcome)
        return lost

    def withdraw(self, tasks: Sequence[Task]) -> list[Task]:
        taken = []
        with self.service.lock:
            for task in tasks:
                if task.id in self.service.queued:
                    self.service.queued.remove(task.id)
                    self.service.tasks.pop(task.id)
                    self.service.listeners.pop(task.id, None)
                    taken.append(task)
        return taken

    def cancel(self, tasks: Sequence[Task]) -> None:
        self.withdraw(tasks)
        with self.service.lock:
            for task in tasks:
                self.service.listeners.pop(task.id, None)

    def counts(self) -> tuple[int, int]:
        with self.service.lock:
            queued = sum(1 for i in self.service.queued if i in self.mine)
            return queued, len(self.service.running & self.mine)

    def shutdown(self) -> None:
        with self.service.lock:
            for task_id in self.mine:
                self.service.listeners.pop(task_id, None)


@dataclass(frozen=True)
class Fake:
    """The backend of the fake executor: one process-wide service of ``slots`` threads."""

    slots: int = 1
    name: str = "fake"
    remote = False

    def check(self) -> None:
        return None

    def open(self, run: RunContext) -> FakeExecutor:
        global SERVICE
        if SERVICE is None:
            SERVICE = FakeService(self.slots)
        return FakeExecutor(SERVICE)


# -- harnesses -------------------------------------------------------------------------------------


class Outcomes:
    """The ``done`` of a test: outcomes as they come, waited for without sleeping."""

    def __init__(self) -> None:
        self.items: list[Outcome] = []
        self._cond = threading.Condition()

    def __call__(self, outcome: Outcome) -> None:
        with self._cond:
            self.items.append(outcome)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 60.0) -> list[Outcome]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= count, timeout), (
                f"{len(self.items)} of {count} outcomes in {timeout} s"
            )
            return list(self.items)

    def by_call(self) -> dict[int, Outcome]:
        with self._cond:
            return {o.call_id: o for o in self.items}


@dataclass
class Harness:
    """A fresh run of one executor: its backend, a store both sides reach, and task making."""

    name: str
    settings: dict[str, Any]
    slots: int  # attempts that run at once
    store: Store
    directory: Path
    execution_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: str = field(default_factory=new_owner)

    def __post_init__(self) -> None:
        self.backend = create_backend(self.name, self.settings)
        self.backend.check()
        key = f"contract-{self.name}-{self.execution_id[:8]}"
        self.run = RunContext(self.execution_id, key, self.store.url, self.store.signer)
        self.codec = ValueCodec(self.store.load_blob)
        self.gate = self.directory / f"gate-{self.execution_id}"
        values = {
            "id": self.execution_id,
            "key": key,
            "status": "running",
            "code": "contract",
            "code_hash": "h",
            "code_sig": "s",
            "monty_version": "contract",
            "fingerprints": None,
            "previous_id": None,
        }
        assert self.store.create_execution(values, self.owner, 600, expected_latest=None)
        self._shipped: dict[int, str] = {}
        self._calls = iter(range(1, 1_000_000))

    def open(self) -> Any:
        return self.backend.open(self.run)

    def task(self, fn: Callable[..., Any], *args: Any) -> Task:
        """The first attempt of a new call of ``fn(*args)``, as the driver describes it."""
        task = Task(self.execution_id, next(self._calls), 1, fn.__name__)
        if self.backend.remote:
            key = self._shipped.get(id(fn))
            if key is None:
                key, data = ship_function(fn, fn.__name__)
                self.store.commit(self.execution_id, self.owner, 600, Step(functions={key: (fn.__name__, "f", data)}))
                self._shipped[id(fn)] = key
            task.function_key = key
            task.args = self.codec.encode_arguments(args, {})
            if len(task.args) > INLINE_LIMIT:  # as the driver sends them: a blob's key, not the text
                data = task.args.encode()
                task.args_blob = blob_key(data)
                self.store.commit(self.execution_id, self.owner, 600, Step(blobs={task.args_blob: (data, "arguments")}))
        else:
            task.local = LocalCall(fn, args, {})
        return task

    def value(self, outcome: Outcome) -> Any:
        assert outcome.ok, outcome.error
        if outcome.in_store:  # a large result only the store holds: read as the driver reads it
            record = self.store.load_attempts([Task(self.execution_id, outcome.call_id, outcome.attempt, "").id])
            outcome = outcome_of(next(iter(record.values())))
        return self.codec.decode_host(outcome.result) if outcome.result is not None else outcome.value

    def marker(self, name: str) -> Path:
        return self.directory / f"{self.execution_id}-{name}"


def gated(gate: str, marker: str, value: Any, end: str = "") -> Any:
    """Marks that it started, waits for the gate file, marks ``end`` (if given); returns ``value``."""
    Path(marker).touch()
    while not os.path.exists(gate):
        time.sleep(0.01)
    if end:
        Path(end).touch()
    return value


def pid_of(value: Any) -> list[Any]:
    return [value, os.getpid()]


def broken(item: str) -> None:
    raise KeyError(f"no such item {item}")


def asks_to_wait(seconds: float) -> None:
    raise RetryAfter(seconds, "slow down")


def sized(text: str, n: int) -> list[Any]:
    return [len(text), text[-3:], "y" * n]


def doubled(x: int) -> int:
    return x * 2


def _functions() -> dict[str, Callable[..., Any]]:
    """The scenario's functions, made by value (workers cannot import this module)."""
    namespace: dict[str, Any] = {"os": os, "time": time, "Path": Path, "Any": Any, "RetryAfter": RetryAfter}
    for fn in (gated, pid_of, broken, asks_to_wait, sized, doubled):
        # A copy whose module is __main__, as a notebook cell's function: cloudpickle ships it whole.
        copy = type(fn)(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__module__ = "__main__"
        namespace[fn.__name__] = copy
    return namespace


FUNCTIONS = _functions()


# -- the services, once per module -----------------------------------------------------------------


class Services:
    """Starts each executor's service the first time a test needs it; stops them all at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store = Store(f"sqlite:///{directory / 'contract.db'}")
        self.found: dict[str, dict[str, Any]] = {}
        self._stop: list[Callable[[], None]] = []

    def settings(self, name: str) -> tuple[dict[str, Any], int]:
        if name not in self.found:
            self.found[name] = getattr(self, f"_start_{name}")()
        found = self.found[name]
        return found["settings"], found["slots"]

    def _start_threads(self) -> dict[str, Any]:
        return {"settings": {"workers": 1}, "slots": 1}

    def _start_fake(self) -> dict[str, Any]:
        register_executor("fake", Fake, replace=True)
        self._stop.append(lambda: unregister_executor("fake"))
        return {"settings": {}, "slots": 1}

    def _start_rq(self) -> dict[str, Any]:
        require_module("rq", extra="rq")
        from ci import REDIS_URL
        from redis import Redis
        from test_rq import Workers

        try:
            Redis.from_url(REDIS_URL, socket_connect_timeout=3).flushdb()
        except Exception as exc:
            from ci import unavailable

            unavailable(f"Redis ({REDIS_URL})", exc)
        workers = Workers(REDIS_URL, f"contract-{uuid.uuid4().hex[:8]}", {})
        workers.start(1)
        self._stop.append(workers.stop)
        from rq import Queue, Worker

        queue = Queue(workers.queue, connection=Redis.from_url(REDIS_URL))
        # listening before the first task (else the executor rightly says nobody listens)
        wait_until(lambda: Worker.all(queue=queue), what="the rq worker listening")
        return {"settings": {"url": REDIS_URL, "queue": workers.queue}, "slots": 1}

    def _start_dask(self) -> dict[str, Any]:
        require_module("distributed", extra="dask")
        from test_dask import Cluster

        from durable_monty_nb.executors.dask import close_clients

        (self.directory / "dask").mkdir()
        cluster = Cluster(self.directory / "dask")
        self._stop += [cluster.close, close_clients]
        return {"settings": {"address": cluster.address}, "slots": 2}

    def close(self) -> None:
        for stop in reversed(self._stop):
            stop()
        self.store.close()


EXECUTORS = ["fake", "threads", "rq", "dask"]


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    found = Services(tmp_path_factory.mktemp("contract"))
    yield found
    found.close()


@pytest.fixture(params=EXECUTORS)
def harness(request: pytest.FixtureRequest, services: Services) -> Iterator[Harness]:
    settings, slots = services.settings(request.param)
    found = Harness(request.param, settings, slots, services.store, services.directory)
    yield found
    found.gate.touch()  # nothing stays blocked after a failed test


# -- the contract ----------------------------------------------------------------------------------


def test_every_registered_executor_has_a_harness(services: Services) -> None:
    services.settings("fake")  # registered by its harness
    assert set(executor_names()) <= set(EXECUTORS), "give a new executor a harness in this module"


def test_each_task_reports_one_outcome_with_its_value(harness: Harness) -> None:
    executor, done = harness.open(), Outcomes()
    assert executor.name == harness.name and executor.remote == harness.backend.remote
    tasks = [harness.task(FUNCTIONS["pid_of"], {"i": i}) for i in range(5)]
    executor.submit(tasks, done)
    outcomes = done.wait(5)
    assert sorted((o.call_id, o.attempt) for o in outcomes) == sorted((t.call_id, t.attempt) for t in tasks)
    by_call = done.by_call()
    pids = set()
    for task in tasks:
        value, pid = harness.value(by_call[task.call_id])
        assert value == {"i": task.call_id - tasks[0].call_id}
        pids.add(pid)
    # remote is honest: remote tasks ran elsewhere from their data alone, in-process ones here
    assert (os.getpid() in pids) is (not executor.remote)
    assert executor.counts() == (0, 0)
    assert executor.problem is None
    executor.shutdown()


def test_a_failure_carries_its_names_message_and_traceback(harness: Harness) -> None:
    executor, done = harness.open(), Outcomes()
    executor.submit([harness.task(FUNCTIONS["broken"], "x7")], done)
    (outcome,) = done.wait(1)
    assert not outcome.ok and not outcome.lost
    error = outcome.error
    assert error is not None and error.types[0] == "builtins.KeyError" and error.is_a([LookupError])
    assert "no such item x7" in error.message
    # where it was raised: the function and the line (remote workers name code shipped by value
    # "<dynamic-code>"; the driver gives those frames back their source, see engine/frames.py)
    line = FUNCTIONS["broken"].__code__.co_firstlineno + 1
    assert f"line {line}, in broken" in error.traceback, error.traceback
    if not harness.backend.remote:
        assert f'File "{__file__}", line {line}' in error.traceback
        assert 'raise KeyError(f"no such item {item}")' in error.traceback
    executor.shutdown()


def test_a_retry_afters_delay_arrives_as_a_number(harness: Harness) -> None:
    executor, done = harness.open(), Outcomes()
    executor.submit([harness.task(FUNCTIONS["asks_to_wait"], 2.5)], done)
    (outcome,) = done.wait(1)
    assert outcome.error is not None and outcome.error.retry_after == 2.5
    assert outcome.error.types[0] == "durable_monty_nb.engine.controls.RetryAfter"
    executor.shutdown()


def _block(harness: Harness, executor: Any, done: Outcomes) -> list[Task]:
    """Fill every slot of the executor with a gated task; return once all of them run."""
    gate = str(harness.gate)
    blockers = [
        harness.task(FUNCTIONS["gated"], gate, str(harness.marker(f"blocker-{i}")), i) for i in range(harness.slots)
    ]
    executor.submit(blockers, done)
    wait_until(
        lambda: all(harness.marker(f"blocker-{i}").exists() for i in range(harness.slots)), what="blockers running"
    )
    return blockers


def test_withdraw_takes_back_queued_tasks_only_and_they_never_run(harness: Harness) -> None:
    executor, done = harness.open(), Outcomes()
    withdraw = getattr(executor, "withdraw", None)
    # Every executor here can take queued tasks back (Cancel relies on it); one that cannot would
    # need its own case here, saying the driver lets its queued tasks run.
    assert withdraw is not None, f"the {harness.name} executor cannot take tasks back"
    blockers = _block(harness, executor, done)
    markers = [harness.marker(f"queued-{i}") for i in range(4)]
    queued = [harness.task(FUNCTIONS["gated"], str(harness.gate), str(m), i) for i, m in enumerate(markers)]
    executor.submit(queued, done)
    assert sum(executor.counts()) == len(blockers) + len(queued)  # what waits and what runs is counted
    # Running ones are never taken back; queued ones are, once the service has them (Dask reads a
    # batch in the background: until then its tasks are left to run, so ask again).
    taken = withdraw([*queued, *blockers])
    wait_until(lambda: taken or taken.extend(withdraw(queued)) or taken, what="a queued task taken back")
    assert {t.id for t in taken} <= {t.id for t in queued}, "a running task was taken back"
    harness.gate.touch()
    left = len(blockers) + len(queued) - len(taken)
    done.wait(left)
    # after the last one, a task submitted now: a withdrawn one that ran anyway would have come first
    last = harness.task(FUNCTIONS["pid_of"], "last")
    executor.submit([last], done)
    done.wait(left + 1)
    reported = {o.call_id for o in done.items}
    assert not reported & {t.call_id for t in taken}
    assert not [m for t, m in zip(queued, markers, strict=True) if t in taken and m.exists()]
    assert executor.counts() == (0, 0)
    executor.shutdown()


def _quiet(executor: Any) -> None:
    """As if its process had died: wait for its watcher thread (if any) to stop after shutdown."""
    executor.shutdown()
    thread = getattr(executor, "_thread", None)
    if thread is not None:
        thread.join(10)
        assert not thread.is_alive()


def test_another_executor_attaches_by_id_when_durable(harness: Harness) -> None:
    first = harness.open()
    away, gate_away = harness.marker("away"), harness.directory / f"gate-away-{harness.execution_id}"
    # One attempt finishes while no executor listens, one still runs when the second one attaches.
    finished = harness.task(FUNCTIONS["gated"], str(gate_away), str(away), "finished while away", str(away) + "-end")
    running = harness.task(FUNCTIONS["gated"], str(harness.gate), str(harness.marker("running")), "kept")
    first.submit([finished, running], Outcomes())
    wait_until(away.exists, what="the first attempt running")
    _quiet(first)  # as if its process had died
    gate_away.touch()
    wait_until(harness.marker("running").exists, what="the second attempt running")
    wait_until(Path(str(away) + "-end").exists, what="the first attempt finishing")
    never = harness.task(FUNCTIONS["pid_of"], "never submitted")

    second, done = harness.open(), Outcomes()
    lost = {t.id for t in second.attach([finished, running, never], done)}
    if not second.durable:  # honest: attempts of another executor object cannot be followed
        assert lost == {finished.id, running.id, never.id}
        return
    assert never.id in lost and running.id not in lost
    harness.gate.touch()
    done.wait(1 if finished.id in lost else 2)
    by_call = done.by_call()
    assert harness.value(by_call[running.call_id]) == "kept"
    if finished.id in lost:  # it ended with nobody listening: its outcome is in the store
        record = wait_until(lambda: harness.store.load_attempts([finished.id]).get(finished.id), what="its record")
        assert harness.value(outcome_of(record)) == "finished while away"
    else:
        assert harness.value(by_call[finished.call_id]) == "finished while away"
    assert never.call_id not in by_call
    second.shutdown()


def test_large_arguments_and_results_arrive_intact(harness: Harness) -> None:
    executor, done = harness.open(), Outcomes()
    text = "".join(chr(97 + i % 26) for i in range(INLINE_LIMIT * 5))  # 320 KB: a remote one sends a blob key
    task = harness.task(FUNCTIONS["sized"], text, 3_000_000)
    assert bool(task.args_blob) is harness.backend.remote
    executor.submit([task], done)
    (outcome,) = done.wait(1)
    assert outcome.in_store is harness.backend.remote  # a remote one leaves a large result in the store
    assert harness.value(outcome) == [len(text), text[-3:], "y" * 3_000_000]
    executor.shutdown()


def test_a_tampered_shipped_function_is_refused_and_never_runs(harness: Harness) -> None:
    """Remote executors load functions from the store: a pickle changed there (here, a valid one
    that returns something else) is refused by its signature. In-process ones run the live
    callable and never read it."""
    import cloudpickle
    import sqlalchemy as sa

    fn = FUNCTIONS["doubled"]
    fresh = type(fn)(fn.__code__, fn.__globals__, f"doubled_{uuid.uuid4().hex[:8]}")  # never loaded by a worker
    fresh.__module__ = "__main__"
    task = harness.task(fresh, 4)
    db = sa.create_engine(harness.store.url)
    with db.begin() as conn:
        changed = conn.execute(
            sa.text("UPDATE dm_functions SET data = :data WHERE key = :key"),
            {"data": cloudpickle.dumps(lambda x: x * 1000), "key": task.function_key},
        ).rowcount
    db.dispose()
    executor, done = harness.open(), Outcomes()
    executor.submit([task], done)
    (outcome,) = done.wait(1)
    if not harness.backend.remote:
        assert changed == 0 and harness.value(outcome) == 8
        executor.shutdown()
        return
    assert changed == 1
    assert not outcome.ok and outcome.error is not None
    assert outcome.error.types[0] == "durable_monty_nb.errors.TamperedDataError", outcome.error.types
    assert "integrity check" in outcome.error.message and fresh.__name__ in outcome.error.message
    executor.shutdown()
