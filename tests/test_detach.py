"""Detached runs: a real ``durable-monty-nb runner`` subprocess drives what a process handed over.

Runner kills, two runners racing, a runner with another signing key, cancel through the store.
The functions are defined as a notebook cell defines them (in ``__main__``), so they reach the
runner by value.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import wait_until

from durable_monty_nb import Engine
from durable_monty_nb.engine.detached import CLAIM_WAIT
from durable_monty_nb.store import handoffs

pytestmark = pytest.mark.timeout(120)
RUNNER = (sys.executable, "-m", "durable_monty_nb", "runner")

CELL_FUNCTIONS = """
import os, time

LOG = os.environ["SIDE_LOG"]
GATE = os.environ["GATE_FILE"]


def step(i, held_from=3):  # holds while the gate file exists (test scaffolding, not a timer)
    if i >= held_from and os.path.exists(GATE):
        open(GATE + ".held", "a").close()  # a test can see a call holding
    while i >= held_from and os.path.exists(GATE):
        time.sleep(0.01)
    with open(LOG, "a") as handle:
        handle.write(f"{os.getpid()} {i}\\n")
    return i * 10
"""

STAMP = """

def stamp(i):  # logs when it starts; its first call of 1 fails once
    with open(LOG, "a") as handle:
        handle.write(f"{i} {time.time()}\\n")
    if i == 1 and not os.path.exists(LOG + ".failed"):
        open(LOG + ".failed", "w").close()
        raise ConnectionError("flaky once")
    return i
"""

SEQUENTIAL = """
results = []
for i in range(6):
    results.append(await step(i))
total = sum(results)
total
"""


def notebook(source: str) -> dict[str, Any]:
    """The namespace a notebook cell with this source leaves (its functions live in ``__main__``)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


class Runners:
    """``durable-monty-nb runner`` subprocesses of one store; each one's output in a file."""

    def __init__(self, db_url: str, folder: Path) -> None:
        self.db_url = db_url
        self.folder = folder
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, name: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        out = open(self.folder / f"{name}.out", "w")  # noqa: SIM115  (the process writes it)
        proc = subprocess.Popen(
            [*RUNNER, "--db", self.db_url, "--poll", "0.05", "--name", name, *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        out.close()
        self.procs.append(proc)
        return proc

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.out").read_text()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    log, gate = tmp_path / "side.log", tmp_path / "gate"
    monkeypatch.setenv("SIDE_LOG", str(log))
    monkeypatch.setenv("GATE_FILE", str(gate))
    yield log, gate


@pytest.fixture
def runners(tmp_path: Path) -> Iterator[Runners]:
    found = Runners(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    yield found
    found.stop()


def logged(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [(int(pid), int(i)) for pid, i in (line.split() for line in log.read_text().splitlines())]


def test_a_runner_completes_a_handed_over_run_and_the_cell_run_again_gets_it_from_the_store(
    side: tuple[Path, Path], runners: Runners
) -> None:
    log, _ = side
    ns = notebook(CELL_FUNCTIONS)
    engine = Engine(runners.db_url)
    run = engine.start(SEQUENTIAL, ns, key="nightly", detach=True)
    assert not run.done  # handed over: nothing runs here
    proc = runners.start("r1")
    assert run.result(60) == 150
    assert run.outputs["results"] == [0, 10, 20, 30, 40, 50]
    assert {pid for pid, _ in logged(log)} == {proc.pid}  # the calls ran in the runner's threads
    again = Engine(runners.db_url).start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="nightly", detach=True)
    assert again.cached and again.result(5) == 150 and again.outputs["total"] == 150
    assert len(logged(log)) == 6


def test_the_runner_keeps_the_runs_call_controls_a_rate_object_too(side: tuple[Path, Path], runners: Runners) -> None:
    from durable_monty_nb import Rate, RetryPolicy

    log, _ = side
    ns = notebook(CELL_FUNCTIONS + STAMP)
    engine = Engine(runners.db_url)
    # One start per 0.4 s, a rate no "N/s" text can say; and one retry for the flaky call.
    options = {"rate": Rate(1, 0.4), "retry": RetryPolicy(retries=1, delay=0)}
    run = engine.start("await gather(*[stamp(i) for i in range(3)])", ns, key="paced", detach=True, **options)
    runners.start("r1")
    assert run.result(60) == [0, 1, 2]
    starts = sorted(float(line.split()[1]) for line in log.read_text().splitlines())
    assert len(starts) == 4  # stamp(1) failed once and was retried, as the run's policy says
    assert all(later - earlier >= 0.39 for earlier, later in itertools.pairwise(starts))  # the rate held


def test_no_runner_listening_says_so_with_the_command(side: tuple[Path, Path], tmp_path: Path) -> None:
    engine = Engine(f"sqlite:///{tmp_path / 'store.db'}")
    run = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="lonely", detach=True)
    assert run.progress.note is None  # a runner gets a few seconds to claim it
    note = wait_until(lambda: run.progress.note, timeout=CLAIM_WAIT + 10, what="the no-runner note")
    assert "no runner has claimed this run" in note
    assert f"durable-monty-nb runner --db '{engine.store.display_url}'" in note


def test_watchers_show_only_the_live_counts_of_the_runner_that_holds_the_lease(
    side: tuple[Path, Path], tmp_path: Path
) -> None:
    engine = Engine(f"sqlite:///{tmp_path / 'store.db'}")
    run = engine.start(GATHER, notebook(CELL_FUNCTIONS), key="fenced", detach=True)
    assert engine.store.acquire_lease(run.execution_id, "holder", 60) is None  # a runner claims it
    counts = {"running": 2, "queued": 4, "calls": {"running": [0, 1], "queued": [2, 3, 4, 5]}}
    handoffs.write_progress(engine.store, run.execution_id, {**counts, "owner": "lost-its-lease"})
    assert (run.progress.running, run.progress.queued) == (0, 0)  # a runner that lost the lease: not shown
    handoffs.write_progress(engine.store, run.execution_id, {**counts, "owner": "holder"})
    assert (run.progress.running, run.progress.queued) == (2, 4)


def test_a_sigkilled_runner_is_replaced_and_no_completed_call_runs_twice(
    side: tuple[Path, Path], runners: Runners
) -> None:
    log, gate = side
    gate.touch()
    engine = Engine(runners.db_url)
    run = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="killed", detach=True)
    first = runners.start("first")
    wait_until(lambda: len(logged(log)) >= 3, what="three calls done by the first runner", procs=(first,))
    row = wait_until(
        lambda: (r := engine.store.get_execution(run.execution_id)).calls_total == 4 and r,
        what="the held call dispatched",
    )
    done_at_kill = {c.call_id for c in engine.store.load_calls(row.id) if c.status == "done"}
    assert len(done_at_kill) == 3
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    gate.unlink()
    second = runners.start("second")
    assert run.result(60) == 150
    entries = logged(log)
    assert sorted(i for _, i in entries) == [0, 1, 2, 3, 4, 5]  # the held call never finished in the first
    assert [i for pid, i in entries if pid == first.pid] == [0, 1, 2]
    assert [i for pid, i in entries if pid == second.pid] == [3, 4, 5]
    assert "drives 'killed'" in runners.output("second")


def test_two_runners_racing_drive_every_run_once(side: tuple[Path, Path], runners: Runners) -> None:
    log, _ = side
    engine = Engine(runners.db_url)
    code = "a = await step(base)\nb = await step(base + 1)\na + b"
    runs = [
        engine.start(code, {**notebook(CELL_FUNCTIONS), "base": 10 * n}, key=f"race-{n}", detach=True) for n in range(6)
    ]
    one, two = runners.start("one"), runners.start("two")
    for n, run in enumerate(runs):
        assert run.result(60) == (10 * n) * 10 + (10 * n + 1) * 10
    entries = logged(log)
    assert sorted(i for _, i in entries) == sorted(i for n in range(6) for i in (10 * n, 10 * n + 1))
    for n in range(6):  # both calls of a run in one runner: no run was driven by two
        assert len({pid for pid, i in entries if i in (10 * n, 10 * n + 1)}) == 1
    assert {pid for pid, _ in entries} <= {one.pid, two.pid}


def test_a_runner_with_another_key_refuses_naming_the_mismatch_and_leaves_the_run(
    side: tuple[Path, Path], runners: Runners
) -> None:
    engine = Engine(runners.db_url)
    run = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="keyed", detach=True)
    runners.start("stranger", env={"DURABLE_MONTY_KEY": "another-key"})
    note = wait_until(lambda: "refused" in (run.progress.note or "") and run.progress.note, what="the refusal")
    assert "another signing key" in note and "stranger" in note
    handoff = handoffs.load_handoff(engine.store, run.execution_id)
    assert handoff is not None and handoff.armed and engine.store.get_execution(run.execution_id).calls_total == 0
    runners.start("keeper")
    assert run.result(60) == 150


def test_a_tampered_function_is_refused(side: tuple[Path, Path], runners: Runners) -> None:
    engine = Engine(runners.db_url)
    run = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="tampered", detach=True)
    with engine.store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE dm_functions SET data = X'00'")
    runners.start("careful")
    note = wait_until(lambda: "refused" in (run.progress.note or "") and run.progress.note, what="the refusal")
    assert "failed its integrity check" in note and "'step'" in note


def test_cancel_through_the_store_stops_the_run_its_runner_drives(side: tuple[Path, Path], runners: Runners) -> None:
    log, gate = side
    gate.touch()
    engine = Engine(runners.db_url)
    run = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="cancelled", detach=True)
    runners.start("r")
    wait_until(lambda: len(logged(log)) >= 3, what="three calls done")
    other = Engine(runners.db_url)  # another process's engine: it drives nothing itself
    assert other.cancel("cancelled")
    wait_until(lambda: "cancels 'cancelled'" in runners.output("r"), what="the runner passing the cancel on")
    gate.unlink()  # the held call finishes and is kept
    assert run.wait(60) and run.status == "interrupted"
    assert engine.store.get_execution(run.execution_id).status == "interrupted"
    assert len(logged(log)) == 4
    again = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="cancelled", detach=True)  # handed over again
    assert again.result(60) == 150
    assert sorted(i for _, i in logged(log)) == [0, 1, 2, 3, 4, 5]


# -- real kernels ----------------------------------------------------------------------------------

DETACHED_CELL = "%%durable nightly --detach\n" + SEQUENTIAL.strip()
SIGNAL_CELL = "%%durable approval --detach\nv = await signal('go')\nr = await step(v, held_from=99)\nr"


def kernel_env(runners: Runners, side: tuple[Path, Path]) -> dict[str, str]:
    log, gate = side
    return {"SIDE_LOG": str(log), "GATE_FILE": str(gate), "DURABLE_MONTY_DB": runners.db_url}


def notebook_kernel(folder: Path, env: dict[str, str]) -> Any:
    from kernels import Kernel

    kernel = Kernel(folder, env)
    kernel.ok("%load_ext durable_monty_nb")
    kernel.ok(CELL_FUNCTIONS)
    return kernel


def latest(db_url: str, key: str) -> Any:
    from durable_monty_nb.store.store import Store

    store = Store(db_url)
    try:
        return store.latest_execution(key)
    finally:
        store.close()


@pytest.mark.kernel
def test_a_kernel_hands_over_and_shuts_down_and_a_new_kernel_gets_the_result_and_the_names(
    side: tuple[Path, Path], runners: Runners, tmp_path: Path
) -> None:
    log, _ = side
    env = kernel_env(runners, side)
    first = notebook_kernel(tmp_path, env)
    try:
        reply = first.ok(DETACHED_CELL)
        assert reply.result is None  # returned at once: the run is handed over
        assert "results" not in first.ok("print(sorted(k for k in dir() if k == 'results'))").streams
    finally:
        first.close()
    assert not logged(log)  # nothing ran in the kernel
    proc = runners.start("overnight")
    wait_until(lambda: (row := latest(runners.db_url, "nightly")) and row.status == "completed", what="completion")
    second = notebook_kernel(tmp_path, env)
    try:
        reply = second.ok(DETACHED_CELL)
        assert reply.result == "150"
        names = second.ok("print(results, total, type(results).__name__)").streams
        assert names.strip() == "[0, 10, 20, 30, 40, 50] 150 list"
    finally:
        second.close()
    assert {pid for pid, _ in logged(log)} == {proc.pid} and len(logged(log)) == 6


@pytest.mark.kernel
def test_a_kernel_re_attaches_to_a_run_still_going_sees_its_runner_and_another_kernel_cancels_it(
    side: tuple[Path, Path], runners: Runners, tmp_path: Path
) -> None:
    log, gate = side
    gate.touch()
    env = kernel_env(runners, side)
    first = notebook_kernel(tmp_path, env)
    try:
        first.ok(DETACHED_CELL)
        note = first.ok(WAIT_FOR_NOTE).streams
        assert "no runner has claimed this run" in note and "durable-monty-nb runner --db" in note
    finally:
        first.close()
    runners.start("night-shift")
    wait_until(lambda: len(logged(log)) >= 3, what="three calls done by the runner")
    second = notebook_kernel(tmp_path, env)
    try:
        reply = second.ok(DETACHED_CELL)
        assert reply.result is None  # still going: the cell re-attaches and returns
        status = second.ok("%durable_status").result or ""
        assert "night-shift" in status, status
        detail = second.ok("%durable_status nightly").result or ""
        assert "runner: night-shift" in detail, detail
        third = notebook_kernel(tmp_path, env)
        try:
            third.ok("%durable_cancel nightly")
        finally:
            third.close()
        wait_until(lambda: "cancels 'nightly'" in runners.output("night-shift"), what="the cancel passed on")
        gate.unlink()
        done = second.ok(WAIT_FOR_END).streams
        assert done.strip() == "interrupted"
    finally:
        second.close()
    assert sorted(i for _, i in logged(log)) == [0, 1, 2, 3]


@pytest.mark.kernel
def test_a_signal_from_a_kernel_that_did_not_start_the_run(
    side: tuple[Path, Path], runners: Runners, tmp_path: Path
) -> None:
    env = kernel_env(runners, side)
    first = notebook_kernel(tmp_path, env)
    try:
        first.ok(SIGNAL_CELL)
    finally:
        first.close()
    runners.start("approvals")
    wait_until(lambda: (row := latest(runners.db_url, "approval")) and row.calls_total == 1, what="the signal wait")
    other = notebook_kernel(tmp_path, env)
    try:
        other.ok("%durable_signal approval go 7")
        wait_until(lambda: latest(runners.db_url, "approval").status == "completed", what="completion")
        assert other.ok(SIGNAL_CELL).result == "70"
        assert other.ok("print(r, v)").streams.strip() == "70 7"
    finally:
        other.close()


WAIT_FOR_NOTE = """
import time
_run = get_ipython().magics_manager.registry['DurableMagics'].runs['nightly']
_deadline = time.monotonic() + 30
while not _run.progress.note and time.monotonic() < _deadline:
    time.sleep(0.05)
print(_run.progress.note)
"""

WAIT_FOR_END = """
_run = get_ipython().magics_manager.registry['DurableMagics'].runs['nightly']
_run.wait(60)
print(_run.status)
"""


# -- remote executors ------------------------------------------------------------------------------

GATHER = "values = await gather(*[step(i, held_from=2) for i in range(6)])\ntotal = sum(values)\ntotal"


def killed_runner_with_calls_on_workers(
    side: tuple[Path, Path], runners: Runners, executor: str, runner_options: tuple[str, ...]
) -> None:
    """Calls 0 and 1 finish on the workers, 2 and 3 are held there, 4 and 5 wait; the runner is
    SIGKILLed; the held calls finish while no runner lives; a second runner completes the run."""
    log, gate = side
    gate.touch()
    engine = Engine(runners.db_url)
    run = engine.start(GATHER, notebook(CELL_FUNCTIONS), key="remote", detach=True, executor=executor)
    first = runners.start("first", *runner_options)
    wait_until(lambda: len(logged(log)) >= 2, timeout=90, what="two calls done on the workers", procs=(first,))
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    gate.unlink()
    wait_until(lambda: len(logged(log)) >= 4, timeout=60, what="the held calls finishing without a runner")
    second = runners.start("second", *runner_options)
    assert run.result(90) == 150
    assert sorted(i for _, i in logged(log)) == [0, 1, 2, 3, 4, 5]  # no call ran twice
    assert not {pid for pid, _ in logged(log)} & {first.pid, second.pid}  # all on the workers
    assert "drives 'remote'" in runners.output("second")


@pytest.mark.timeout(180)
def test_a_runner_killed_with_calls_on_rq_workers_is_replaced_without_running_a_call_twice(
    side: tuple[Path, Path], runners: Runners, redis_url: str, tmp_path: Path
) -> None:
    from test_rq import TESTS, Workers

    workers = Workers(redis_url, f"q-{tmp_path.name[-20:]}", {"PYTHONPATH": str(TESTS)})
    workers.start(2)
    try:
        killed_runner_with_calls_on_workers(side, runners, "rq", ("--rq-url", workers.url, "--rq-queue", workers.queue))
    finally:
        workers.stop()


@pytest.mark.timeout(180)
def test_a_runner_killed_with_calls_on_dask_workers_is_replaced_without_running_a_call_twice(
    side: tuple[Path, Path], runners: Runners, own_dask_cluster: Any
) -> None:
    killed_runner_with_calls_on_workers(side, runners, "dask", ("--dask-address", own_dask_cluster.address))


def test_the_watching_widget_shows_the_running_and_queued_calls_of_the_runner(
    side: tuple[Path, Path], runners: Runners
) -> None:
    from durable_monty_nb.notebook.views import make_widget

    _, gate = side
    gate.touch()
    engine = Engine(runners.db_url)
    run = engine.start(GATHER, notebook(CELL_FUNCTIONS), key="watched", detach=True)
    runners.start("counted", "--workers", "2")  # calls 0 and 1 finish, 2 and 3 hold both threads, 4 and 5 wait
    held = wait_until(lambda: (p := run.progress).done == 2 and p.running == 2 and p, what="two calls held")
    assert held.queued == 2 and held.total == 6  # read from the store: what the runner publishes
    widget = make_widget(run)
    widget.refresh()
    assert "2 running" in widget._counts.value and "2 queued" in widget._counts.value, widget._counts.value
    assert "<b>2</b>/6 done" in widget._counts.value
    statuses = wait_until(  # the call rows too: which calls run and which wait, not all "pending"
        lambda: (s := [c.status for c in run.calls()]).count("running") == 2 and s, what="the running rows"
    )
    assert statuses.count("done") == 2 and statuses.count("queued") == 2, statuses
    gate.unlink()
    assert run.result(60) == 150
    final = run.progress
    assert (final.done, final.running, final.queued) == (6, 0, 0)


def test_one_thread_of_the_process_follows_every_watching_run(side: tuple[Path, Path], runners: Runners) -> None:
    import threading

    from durable_monty_nb.engine.detached import FOLLOWER

    def watchers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "durable-watch"]

    def followed() -> set[str]:
        return {run.execution_id for _, run in list(FOLLOWER._runs)}

    engine = Engine(runners.db_url)
    code = "a = await step(base)\na"
    ns = notebook(CELL_FUNCTIONS)
    runs = [engine.start(code, {**ns, "base": n}, key=f"followed-{n}", detach=True) for n in range(4)]
    assert len(watchers()) == 1  # not one per run (earlier tests' runs that never end share it too)
    assert {run.execution_id for run in runs} <= followed()
    runners.start("r")
    assert [run.result(60) for run in runs] == [0, 10, 20, 30]
    wait_until(lambda: not {run.execution_id for run in runs} & followed(), what="the ended runs let go")
    assert len(watchers()) <= 1


def test_an_object_the_cell_reads_travels_as_a_signed_blob(side: tuple[Path, Path], runners: Runners) -> None:
    from fractions import Fraction  # the sandbox cannot hold one: it is stored as a blob

    ns = notebook(CELL_FUNCTIONS + "\n\ndef thrice(x):\n    return float(x * 3)\n")
    engine = Engine(runners.db_url)
    run = engine.start("r = await thrice(third)\nr", {**ns, "third": Fraction(1, 3)}, key="blob", detach=True)
    handoff = handoffs.load_handoff(engine.store, run.execution_id)
    assert handoff is not None and '"$h"' in handoff.inputs["third"]
    runners.start("r")
    assert run.result(60) == 1.0


def test_max_runs_limits_what_one_runner_drives_at_once(side: tuple[Path, Path], runners: Runners) -> None:
    log, gate = side
    gate.touch()
    engine = Engine(runners.db_url)
    first = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="one", detach=True)
    second = engine.start(
        SEQUENTIAL.replace("range(6)", "range(100, 106)"), notebook(CELL_FUNCTIONS), key="two", detach=True
    )
    runners.start("single", "--max-runs", "1")
    wait_until(lambda: len(logged(log)) >= 3, what="the first run's calls before the gate")
    claimed = handoffs.handoffs_of(engine.store, [first.execution_id, second.execution_id])
    assert [h.runner for h in claimed.values()].count("single") == 1  # the other waits for a free slot
    gate.unlink()
    assert first.result(60) == 150 and second.result(60) == sum(10 * i for i in range(100, 106))


def test_sigterm_stops_a_runner_and_leaves_its_runs_to_another(side: tuple[Path, Path], runners: Runners) -> None:
    log, gate = side
    gate.touch()
    engine = Engine(runners.db_url)
    run = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="handed-on", detach=True)
    first = runners.start("first")
    wait_until(lambda: Path(f"{gate}.held").exists(), what="the fourth call running")
    first.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in runners.output("first"), what="the runner stopping")
    gate.unlink()  # the call it was running finishes and is kept
    assert first.wait(30) == 0
    assert not run.done  # left for another runner, not ended
    second = runners.start("second")
    assert run.result(60) == 150
    assert sorted(i for _, i in logged(log)) == [0, 1, 2, 3, 4, 5]
    assert [i for pid, i in logged(log) if pid == second.pid] == [4, 5]


def test_a_function_the_runner_cannot_load_fails_its_call_with_the_hint_and_resumes_after_a_fix(
    side: tuple[Path, Path], runners: Runners, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from durable_monty_nb.errors import WorkflowFailed

    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "kernel_only_helpers.py").write_text("def bonus(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(modules))  # importable here, not (yet) where the runner runs
    ns = notebook(
        CELL_FUNCTIONS + "\nimport kernel_only_helpers\n\ndef boosted(x):\n    return kernel_only_helpers.bonus(x)\n"
    )
    code = "a = await step(1)\nb = await boosted(a)\nb"
    engine = Engine(runners.db_url)
    run = engine.start(code, ns, key="missing-module", detach=True)
    runners.start("bare")
    assert run.wait(60)
    with pytest.raises(WorkflowFailed) as failed:
        run.result()
    text = failed.value.traceback
    assert "ModuleNotFoundError" in text and "kernel_only_helpers" in text and "could not be loaded on bare" in text
    runners.stop()
    runners.start("fixed", env={"PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")])})
    again = engine.start(code, ns, key="missing-module", detach=True)  # the cell run again, after the fix
    assert again.execution_id == run.execution_id  # resumed, not started anew
    assert again.result(60) == 11
    assert [i for _, i in logged(side[0])] == [1]  # the completed call did not run again


@pytest.mark.timeout(180)
@pytest.mark.parametrize("server", ["postgresql"], indirect=True)
def test_a_runner_rides_out_a_store_outage(side: tuple[Path, Path], tmp_path: Path, server: Any) -> None:
    from proxy import Proxy
    from sqlalchemy.engine import make_url

    log, gate = side
    database = server
    parsed = make_url(database.url)
    proxy = Proxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    through = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    runners = Runners(through, tmp_path)
    try:
        gate.touch()
        engine = Engine(database.url)  # the kernel reaches the database directly
        run = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="outage", detach=True)
        runners.start("rider")
        held = gate.with_name(gate.name + ".held")
        wait_until(held.exists, what="the fourth call running, held at the gate")
        proxy.down()
        gate.unlink()  # the held call finishes while the runner cannot reach the store
        wait_until(lambda: len(logged(log)) >= 4, what="the held call finishing during the outage")
        wait_until(lambda: "store unreachable" in runners.output("rider"), timeout=60, what="the runner noticing")
        proxy.up()
        assert run.result(120) == 150
        assert sorted(i for _, i in logged(log)) == [0, 1, 2, 3, 4, 5]
        engine.close()
    finally:
        runners.stop()
        proxy.close()


@pytest.mark.kernel
@pytest.mark.timeout(180)
@pytest.mark.parametrize("executor", ["rq", "dask"])
def test_a_kernel_hands_a_run_on_remote_workers_over_and_a_new_kernel_gets_the_result(
    side: tuple[Path, Path], runners: Runners, tmp_path: Path, request: pytest.FixtureRequest, executor: str
) -> None:
    from kernels import dask_config, rq_config

    log, _ = side
    workers = None
    if executor == "rq":
        from test_rq import TESTS, Workers

        workers = Workers(request.getfixturevalue("redis_url"), f"q-{tmp_path.name[-20:]}", {"PYTHONPATH": str(TESTS)})
        workers.start(2)
        configure, options = (
            rq_config(workers.url, workers.queue),
            ("--rq-url", workers.url, "--rq-queue", workers.queue),
        )
    else:
        address = request.getfixturevalue("own_dask_cluster").address
        configure, options = dask_config(address), ("--dask-address", address)
    try:
        env = kernel_env(runners, side)
        first = notebook_kernel(tmp_path, env)
        try:
            first.ok(configure)
            assert first.ok(DETACHED_CELL).result is None
        finally:
            first.close()
        runner = runners.start("remote-runner", *options)
        wait_until(
            lambda: (row := latest(runners.db_url, "nightly")) and row.status == "completed",
            timeout=90,
            what="completion",
            procs=(runner,),
        )
        second = notebook_kernel(tmp_path, env)
        try:
            second.ok(configure)
            assert second.ok(DETACHED_CELL).result == "150"
            assert second.ok("print(results)").streams.strip() == "[0, 10, 20, 30, 40, 50]"
        finally:
            second.close()
        assert sorted(i for _, i in logged(log)) == [0, 1, 2, 3, 4, 5]
        assert runner.pid not in {pid for pid, _ in logged(log)}  # on the workers
    finally:
        if workers is not None:
            workers.stop()


def test_a_run_whose_executor_the_runner_cannot_reach_is_refused_and_blocks_no_other(
    side: tuple[Path, Path], runners: Runners
) -> None:
    engine = Engine(runners.db_url)
    stuck = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="on-rq", detach=True, executor="rq")
    other = engine.start(SEQUENTIAL, notebook(CELL_FUNCTIONS), key="on-threads", detach=True)
    runners.start("r", "--rq-url", "redis://127.0.0.1:9/0")  # nothing listens there
    assert other.result(60) == 150
    note = wait_until(lambda: "refused" in (stuck.progress.note or "") and stuck.progress.note, what="the refusal")
    assert "redis://127.0.0.1:9/0" in note or "Redis" in note, note
    assert not stuck.done
