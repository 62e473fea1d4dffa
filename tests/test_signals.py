"""Durable signals: the mailbox semantics, waits across SIGKILL of a process and of a kernel,
concurrent deliveries, timeouts, and the magic / CLI / widget faces.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from ci import require_module
from procs import free_port, fuzz_random, kill, log_entries, wait_until

from durable_monty_nb import Engine, WorkflowFailed
from durable_monty_nb.store import mailbox
from durable_monty_nb.store.mailbox import SignalError
from durable_monty_nb.store.store import Store

TESTS = Path(__file__).resolve().parent


def consumed(store: Store, execution_id: str) -> list[tuple[int, str, Any, int | None]]:
    """(seq, name, value, consumed_by) of every delivery of an execution."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT seq, name, value, consumed_by FROM dm_signals WHERE execution_id = :e ORDER BY seq"),
            {"e": execution_id},
        ).all()
    return [(r.seq, r.name, json.loads(r.value), r.consumed_by) for r in rows]


def until_parked(run: Any) -> None:
    wait_until(lambda: run.parked, what="the run to wait for its signals only")


# -- the engine ------------------------------------------------------------------------------------


def test_mailbox_semantics(engine: Engine) -> None:
    gate = threading.Event()

    def work(x: int) -> int:
        gate.wait(30)  # held until the deliveries before the waits are in
        return x * 2

    code = """
a = await work(1)
first = await signal("approval")
second = await signal("approval")
r = await gather(signal("x"), signal("y"), work(5))
[a, first, second, r]
"""
    run = engine.start(code, {"work": work}, key="mail")
    engine.signal("mail", "approval", {"approved": True}, idempotency_key="k1")
    engine.signal("mail", "approval", {"approved": False}, idempotency_key="k1")  # ignored: same key
    engine.signal("mail", "approval", "second")
    assert engine.signal("mail", "approval", "again", idempotency_key="k1").duplicate
    gate.set()
    wait_until(lambda: [w.name for w in run.waits()] == ["x", "y"], what="the gather's two waits")
    assert run.progress.signals == 2
    engine.signal("mail", "y", "Y")
    engine.signal("mail", "x", "X")
    assert run.result(30) == [2, {"approved": True}, "second", ["X", "Y", 10]]
    rows = consumed(engine.store, run.execution_id)
    assert [(seq, name, by is not None) for seq, name, _, by in rows] == [
        (1, "approval", True),
        (2, "approval", True),
        (3, "y", True),
        (4, "x", True),
    ]
    assert len({by for *_, by in rows}) == 4  # each delivery taken by a wait of its own
    with pytest.raises(SignalError, match="has completed"):
        engine.signal("mail", "approval", 1)


def test_a_changed_cell_gets_a_mailbox_of_its_own(engine: Engine) -> None:
    """A delivery kept for the old execution is not taken by the new execution of the edited code."""
    old = engine.start('a = await signal("first")\nb = await signal("go")\n[a, b]', {}, key="edited")
    until_parked(old)
    engine.signal("edited", "go", "for the old code")  # kept: the old run waits for "first"
    old.cancel()
    assert old.wait(30) and old.status == "interrupted"
    new = engine.start('b = await signal("go")\n["edited", b]', {}, key="edited")  # the cell, edited
    assert new.execution_id != old.execution_id
    until_parked(new)  # it waits: the old execution's "go" is not in its mailbox
    assert [w.name for w in new.waits()] == ["go"] and consumed(engine.store, new.execution_id) == []
    engine.signal("edited", "go", "for the new code")  # a name delivers to the latest execution
    assert new.result(30) == ["edited", "for the new code"]
    assert [(v, by) for _, _, v, by in consumed(engine.store, old.execution_id)] == [("for the old code", None)]


def test_timeout_raises_timeout_error_in_the_workflow(sqlite_engine: Engine) -> None:
    code = """
try:
    await signal("late", timeout=0.2)
    outcome = "delivered"
except TimeoutError as exc:
    outcome = str(exc)
outcome
"""
    assert sqlite_engine.run(code, {}, key="t") == "no signal 'late' arrived within 0.2 s"
    with pytest.raises(WorkflowFailed, match="TimeoutError"):
        sqlite_engine.run('await signal("never", timeout=0)', {}, key="t2")


def test_a_deadline_is_durable_across_a_resume(sqlite_engine: Engine) -> None:
    run = sqlite_engine.start('v = await signal("ok", timeout=600)\nv', {}, key="deadline")
    until_parked(run)
    due = sqlite_engine.store.load_calls(run.execution_id)[0].due_at
    run.cancel()
    run.wait(30)
    assert run.status == "interrupted"
    sqlite_engine.signal("deadline", "ok", 7)  # delivered while nobody drives it: kept
    again = sqlite_engine.resume("deadline", {})
    assert again.result(30) == 7
    assert sqlite_engine.store.load_calls(run.execution_id)[0].due_at is None  # answered, no deadline left
    assert due is not None and due > 0


def test_bad_signal_calls_raise_in_the_workflow(sqlite_engine: Engine) -> None:
    code = """
errors = []
for args in [(), ("bad name!",), ("ok", "soon")]:
    try:
        await signal(*args)
    except TypeError as exc:
        errors.append(str(exc)[:30])
errors
"""
    errors = sqlite_engine.run(code, {}, key="bad")
    assert len(errors) == 3
    with pytest.raises(SignalError, match="a signal name"):
        sqlite_engine.signal("bad", "no spaces allowed", 1)


def test_signal_is_never_looked_up_in_the_namespace(sqlite_engine: Engine) -> None:
    import signal as os_signal_module

    run = sqlite_engine.start('x = await signal("s")\nx', {"signal": os_signal_module}, key="ns")
    until_parked(run)
    sqlite_engine.signal("ns", "s", [1, 2])
    assert run.result(30) == [1, 2]


def test_run_signal_from_the_handle_wakes_the_driver_at_once(sqlite_engine: Engine) -> None:
    run = sqlite_engine.start('await signal("go")', {}, key="wake")
    until_parked(run)
    assert run.waits()[0].name == "go"
    run.signal("go", "now")
    assert run.wait(5)  # the heartbeat of this store is 10 s: only the wake-up explains this
    assert run.status == "completed"


def test_resuming_a_run_that_completed_here_after_its_signal_says_what_it_did(sqlite_engine: Engine) -> None:
    """Deliver, then resume (as a notebook does): whether the parked run finished before the
    resume or the resume joined it, the resume gives the run that ran here, not a stored copy."""

    def work(x: int) -> int:
        return x * 2

    run = sqlite_engine.start(
        'a = await work(1)\nb = await signal("go")\nc = await work(b)\nc', {"work": work}, key="go"
    )
    until_parked(run)
    sqlite_engine.signal("go", "go", 20)
    assert run.result(10) == 40  # the parked run went on by itself
    resumed = sqlite_engine.resume("go", {"work": work})
    assert resumed is run and not resumed.cached
    assert (resumed.progress.done, resumed.progress.restored) == (3, 0)
    other = Engine(sqlite_engine.store.url)  # another process: the stored result
    try:
        stored = other.resume("go", {"work": work})
        assert stored.cached and stored.result() == 40 and stored.progress.restored == 3
    finally:
        other.close()


# -- processes killed with SIGKILL ---------------------------------------------------------------------


def spawn(
    db: str,
    key: str,
    log: Path,
    gate: Path | None = None,
    count: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    env = {**os.environ, "SIDE_LOG": str(log), "GATE_FILE": str(gate or ""), **(env or {})}
    args = [sys.executable, str(TESTS / "signal_runner.py"), db, key] + ([str(count)] if count else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def waiting_for(store: Store, key: str, name: str) -> bool:
    row = store.latest_execution(key)
    return row is not None and any(
        c.kind == "signal" and c.status == "pending" and name in c.args for c in store.load_calls(row.id)
    )


def test_kill_while_waiting_deliver_then_resume(sqlite_url: str, tmp_path: Path) -> None:
    store, log = Store(sqlite_url), tmp_path / "side.log"
    first = spawn(sqlite_url, "wf", log)
    wait_until(lambda: waiting_for(store, "wf", "go"), what="the wait", procs=(first,))
    kill(first)
    # The dead process's execution takes deliveries (the duplicate is ignored).
    engine = Engine(sqlite_url)
    engine.signal("wf", "go", {"approved": True}, idempotency_key="once")
    engine.signal("wf", "go", {"approved": False}, idempotency_key="once")
    second = spawn(sqlite_url, "wf", log)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert 'RESULT ["a", {"approved": true}, "recorded"]' in out
    assert [e for _, e in log_entries(log)] == ["step a", 'record {"approved": true}']  # step a ran once
    rows = consumed(store, store.latest_execution("wf").id)
    assert [(seq, by is not None) for seq, _, _, by in rows] == [(1, True)]


def test_kill_right_after_the_delivery_is_consumed(sqlite_url: str, tmp_path: Path) -> None:
    store, log, gate = Store(sqlite_url), tmp_path / "side.log", tmp_path / "gate"
    gate.touch()
    first = spawn(sqlite_url, "wf", log, gate)
    wait_until(lambda: waiting_for(store, "wf", "go"), what="the wait", procs=(first,))
    engine = Engine(sqlite_url)
    engine.signal("wf", "go", 1)
    engine.signal("wf", "go", 2)  # a second delivery stays in the mailbox
    wait_until(lambda: any("record" in e for _, e in log_entries(log)), what="record(1) to start", procs=(first,))
    kill(first)
    gate.unlink()
    second = spawn(sqlite_url, "wf", log)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert 'RESULT ["a", 1, "recorded"]' in out
    rows = consumed(store, store.latest_execution("wf").id)
    assert [(seq, value, by is not None) for seq, _, value, by in rows] == [(1, 1, True), (2, 2, False)]


def test_kill_before_the_wait_with_deliveries_in_the_mailbox(sqlite_url: str, tmp_path: Path) -> None:
    """Both deliveries arrive while the call before the wait is in flight; the kill lands there."""
    store, log, gate = Store(sqlite_url), tmp_path / "side.log", tmp_path / "step-gate"
    gate.touch()
    first = spawn(sqlite_url, "wf", log, env={"STEP_GATE": str(gate)})
    wait_until(lambda: [e for _, e in log_entries(log)] == ["step a"], what="step a to start", procs=(first,))
    engine = Engine(sqlite_url)
    engine.signal("wf", "go", "one")
    engine.signal("wf", "go", "two")
    execution = store.latest_execution("wf").id
    assert not waiting_for(store, "wf", "go")  # the moment chosen: before the wait, both kept
    assert [(value, by) for _, _, value, by in consumed(store, execution)] == [("one", None), ("two", None)]
    kill(first)
    gate.unlink()
    second = spawn(sqlite_url, "wf", log)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert 'RESULT ["a", "one", "recorded"]' in out
    assert [e for _, e in log_entries(log)] == ["step a", "step a", 'record "one"']  # in flight: ran again
    rows = consumed(store, execution)
    assert [(value, by is not None) for _, _, value, by in rows] == [("one", True), ("two", False)]


@pytest.mark.parametrize("run", range(4))
def test_kill_at_a_random_moment_around_the_delivery(sqlite_url: str, tmp_path: Path, run: int) -> None:
    """Beside the chosen moments above: wherever a random kill lands (before the wait, while
    waiting, right after the delivery), the first delivery is consumed exactly once, by the
    wait, and the second stays in the mailbox. The seed is printed (shown on failure)."""
    rng = fuzz_random(run)
    store, log = Store(sqlite_url), tmp_path / "side.log"
    first = spawn(sqlite_url, "wf", log)
    first.stdout.readline()  # STARTED: the execution exists
    engine = Engine(sqlite_url)
    engine.signal("wf", "go", "one")
    engine.signal("wf", "go", "two")
    threading.Event().wait(rng.uniform(0.0, 0.6))  # the random moment of the kill
    kill(first)
    second = spawn(sqlite_url, "wf", log)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert 'RESULT ["a", "one", "recorded"]' in out
    rows = consumed(store, store.latest_execution("wf").id)
    assert [(value, by is not None) for _, _, value, by in rows] == [("one", True), ("two", False)]
    calls = store.load_calls(store.latest_execution("wf").id)
    signal_call = next(c for c in calls if c.kind == "signal")
    assert rows[0][3] == signal_call.call_id and json.loads(signal_call.result) == "one"


def test_two_processes_deliver_at_once(sqlite_url: str, tmp_path: Path) -> None:
    log = tmp_path / "side.log"
    runner = spawn(sqlite_url, "many", log, count=40)
    runner.stdout.readline()
    deliver = (
        "import sys\nfrom durable_monty_nb import Engine\n"
        "engine = Engine(sys.argv[1])\n"
        "for i in range(20):\n    engine.signal('many', 'n', [sys.argv[2], i], idempotency_key=f'{sys.argv[2]}-{i}')\n"
        "    engine.signal('many', 'n', 'dup', idempotency_key=f'{sys.argv[2]}-{i}')\n"
    )
    senders = [
        subprocess.Popen([sys.executable, "-c", deliver, sqlite_url, who], stderr=subprocess.PIPE, text=True)
        for who in ("p", "q")
    ]
    for sender in senders:
        assert sender.wait(120) == 0, sender.stderr.read()
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 0, err
    values = json.loads(out.split("RESULT ", 1)[1])
    assert sorted(map(tuple, values)) == sorted((w, i) for w in "pq" for i in range(20))
    for who in "pq":  # each sender's deliveries arrive in its order
        assert [i for w, i in values if w == who] == list(range(20))
    store = Store(sqlite_url)
    rows = consumed(store, store.latest_execution("many").id)
    assert [seq for seq, *_ in rows] == list(range(1, 41)) and all(by is not None for *_, by in rows)


def test_command_line_delivers(sqlite_url: str) -> None:
    engine = Engine(sqlite_url, lease_ttl=1.5)  # polls the mailbox every 0.5 s
    run = engine.start('v = await signal("approval")\nv', {}, key="cli")
    until_parked(run)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "durable_monty_nb",
            "signal",
            "--db",
            sqlite_url,
            "cli",
            "approval",
            '{"approved": true}',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "delivered 'approval' #1" in done.stdout
    assert run.result(30) == {"approved": True}  # found by the driver's poll (another process)
    status = subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", "status", "--db", sqlite_url, "cli"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "mailbox:" in status and "consumed by call 0" in status
    bad = subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", "signal", "--db", sqlite_url, "cli", "approval", "{"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not JSON" in bad.stderr


def test_status_shows_the_waits_and_the_mailbox(sqlite_engine: Engine) -> None:
    from durable_monty_nb.notebook.status import status_report

    run = sqlite_engine.start('await signal("approval", timeout=3600)', {}, key="st")
    until_parked(run)
    sqlite_engine.signal("st", "other", 1)
    text = status_report(sqlite_engine.store, "st").text
    assert "waiting for signal 'approval'" in text
    assert "%durable_signal st approval" in text
    assert "#1 other = 1" in text and "waiting for a wait" in text
    assert mailbox.count_rows(sqlite_engine.store) == 1


# -- real kernels -----------------------------------------------------------------------------------

DEFINE = """
import os, time, json

def record(value):
    with open(os.environ["SIDE_LOG"], "a") as handle:
        handle.write(f"{os.getpid()} record {json.dumps(value)}\\n")
    while os.path.exists(os.environ["GATE_FILE"]):  # test scaffolding: held while the gate exists
        time.sleep(0.01)
    return "recorded"
"""
CELL = "%%durable approve\ndecision = await signal('approval')\nrecorded = await record(decision)\ndecision"


@pytest.fixture
def kernel_setup(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], Store, str]]:
    db = f"sqlite:///{tmp_path / 'notebook.db'}"
    env = {"SIDE_LOG": str(tmp_path / "side.log"), "GATE_FILE": str(tmp_path / "gate"), "DURABLE_MONTY_DB": db}
    yield tmp_path, env, Store(db), db


def start_kernel(tmp_path: Path, env: dict[str, str]) -> Any:
    from kernels import Kernel

    kernel = Kernel(tmp_path, env)
    kernel.ok("%load_ext durable_monty_nb")
    kernel.ok("%config DurableMagics.lease_ttl = 2")  # other processes' deliveries seen within ~1 s
    kernel.ok(DEFINE)
    return kernel


@pytest.mark.kernel
def test_kernel_killed_while_waiting_then_cli_delivery_and_rerun(kernel_setup: Any) -> None:
    tmp_path, env, store, db = kernel_setup
    kernel = start_kernel(tmp_path, env)
    reply = kernel.ok(CELL)  # parked: the cell returns, the kernel is free
    assert reply.result is None
    assert any("waiting for signal 'approval'" in text for text in reply.widget_text)
    kernel.kill()
    assert waiting_for(store, "approve", "approval")
    subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", "signal", "--db", db, "approve", "approval", '{"approved": true}'],
        check=True,
        capture_output=True,
    )
    kernel = start_kernel(tmp_path, env)
    try:
        assert kernel.ok(CELL).result == "{'approved': True}"
        assert kernel.ok("recorded").result == "'recorded'"
    finally:
        kernel.close()
    rows = consumed(store, store.latest_execution("approve").id)
    assert [(value, by is not None) for _, _, value, by in rows] == [({"approved": True}, True)]


@pytest.mark.kernel
def test_kernel_killed_right_after_the_delivery(kernel_setup: Any) -> None:
    tmp_path, env, store, _ = kernel_setup
    (tmp_path / "gate").touch()
    kernel = start_kernel(tmp_path, env)
    kernel.ok(CELL)
    assert "delivered 'approval' #1" in kernel.ok('%durable_signal approve approval {"approved": false}').streams
    # Its line written, not only the file created: a kill between the two would lose the line.
    wait_until(lambda: log_entries(tmp_path / "side.log"), what="record() to start")
    kernel.kill()
    (tmp_path / "gate").unlink()
    kernel = start_kernel(tmp_path, env)
    try:
        kernel.ok("%durable_resume approve")
        wait_until(lambda: kernel.ok("'recorded' in dir()").result == "True", what="the resumed run to export")
        assert kernel.ok("decision").result == "{'approved': False}"
    finally:
        kernel.close()
    entries = [e for _, e in log_entries(tmp_path / "side.log")]
    assert entries == ['record {"approved": false}'] * 2  # the call in flight ran again; the signal did not
    rows = consumed(store, store.latest_execution("approve").id)
    assert [(value, by is not None) for _, _, value, by in rows] == [({"approved": False}, True)]


@pytest.mark.kernel
def test_approve_button_of_the_widget(kernel_setup: Any) -> None:
    tmp_path, env, store, _ = kernel_setup
    kernel = start_kernel(tmp_path, env)
    try:
        kernel.ok(CELL)
        # Click the Approve button as the browser would (its on_click handler runs in the kernel).
        kernel.ok(
            "from ipywidgets import Button, Widget\n"
            "approve = [w for w in list(Widget.widgets.values())\n"
            "           if isinstance(w, Button) and 'durable-approve' in w._dom_classes]\n"
            "approve[0].click()"
        )
        wait_until(lambda: kernel.ok("'recorded' in dir()").result == "True", what="the run to export")
        assert kernel.ok("decision").result == "{'approved': True}"
    finally:
        kernel.close()
    assert store.latest_execution("approve").status == "completed"


@pytest.mark.kernel
def test_durable_serve_in_the_kernel_and_a_token_from_the_command_line(kernel_setup: Any) -> None:
    httpx = require_module("httpx", extra="test")
    port = free_port()
    tmp_path, env, _, db = kernel_setup
    kernel = start_kernel(tmp_path, env)
    try:
        assert f"on http://127.0.0.1:{port}" in kernel.ok(f"%durable_serve --port {port}").streams
        reply = kernel.ok(CELL)
        curl = re.compile(rf"http://127\.0\.0\.1:{port}/executions/[0-9a-f]{{32}}/signals/approval")
        assert any(curl.search(t) for t in reply.widget_text)  # by execution id: keys may hold '/'
        made = subprocess.run(
            [sys.executable, "-m", "durable_monty_nb", "token", "--db", db, "approve", "--signal", "approval"],
            capture_output=True,
            text=True,
            check=True,
        )
        token = made.stdout.strip()
        assert "curl -X POST" in made.stderr
        answer = httpx.post(
            f"http://127.0.0.1:{port}/executions/approve/signals/approval",
            headers={"Authorization": f"Bearer {token}"},
            json={"value": {"approved": True}},
        )
        assert answer.status_code == 200, answer.text
        wait_until(lambda: kernel.ok("'recorded' in dir()").result == "True", what="the run to export")
        assert kernel.ok("decision").result == "{'approved': True}"
        kernel.ok("%durable_serve --stop")
    finally:
        kernel.close()
