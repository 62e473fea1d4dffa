"""The magics in terminal IPython (no kernel, no widgets): text progress and text tables."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    monkeypatch.setenv("DURABLE_MONTY_DB", f"sqlite:///{tmp_path / 'terminal.db'}")
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    ip.run_cell("def double(x):\n    return x * 2\nitems = [1, 2, 3]")
    yield ip
    ip.run_line_magic("unload_ext", "durable_monty_nb")
    ip.user_ns.pop("doubled", None)


def test_durable_cell_in_a_terminal(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%%durable term\ndoubled = await gather(*[double(i) for i in items])\nsum(doubled)")
    assert result.success and result.result == 12
    assert shell.user_ns["doubled"] == [2, 4, 6]
    out = capsys.readouterr().out
    assert "term: completed · 3/3 calls done" in out  # the text view's final line

    shell.run_cell("%durable_status")
    status = capsys.readouterr().out
    assert "term" in status and "completed" in status and "3/3" in status

    detail = shell.run_line_magic("durable_status", "term")
    assert "double" in repr(detail) and "done" in repr(detail)


def test_errors_render_without_internal_frames(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%%durable broken\nx = await doubel(1)")
    assert not result.success
    err = capsys.readouterr()
    text = err.out + err.err
    assert "UnknownNamesError: not defined in the namespace: 'doubel' (line 1, did you mean 'double'?)" in text
    assert "magics.py" not in text


def test_quiet_cell_prints_no_progress(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%%durable quiet --quiet\nprint('hello from the workflow')\nawait double(4)")
    assert result.result == 8
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "hello from the workflow"
    assert "calls done" not in out


def test_load_ext_lists_unfinished_executions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    from durable_monty_nb import Engine

    db = f"sqlite:///{tmp_path / 'left.db'}"
    release = threading.Event()

    def slow(i: int) -> int:
        release.wait(30)
        return i

    run = Engine(db).start("r = await slow(1)\nr + await slow(2)", {"slow": slow}, key="left-behind")
    run.cancel()
    release.set()
    run.wait(30)
    monkeypatch.setenv("DURABLE_MONTY_DB", db)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    try:
        out = capsys.readouterr().out
        assert "unfinished executions" in out and "left-behind (interrupted" in out
        assert "%durable_resume NAME (or --all)" in out
    finally:
        ip.run_line_magic("unload_ext", "durable_monty_nb")


WARM_UP_PROBE = """
import os, sys
from IPython.core.interactiveshell import InteractiveShell
from durable_monty_nb.engine import warming

def children():
    me = str(os.getpid())
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and _parent(pid) == me]

def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return None

if sys.argv[1:] == ["run-first"]:  # a run began before the warm-up got to its workflow
    warming.run_began()
before = len(children())
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "durable_monty_nb")
warming._warming.join(30)
print(repr(warming.failure), warming.ran)
print(before, len(children()))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
@pytest.mark.parametrize("run_first", [False, True], ids=["idle", "run-first"])
def test_load_ext_starts_a_monty_worker_before_the_first_cell(tmp_path: Path, run_first: bool) -> None:
    """The first %%durable cell does not wait for Monty's pool and worker process to start, nor
    for code every run takes to run a first time: loading the extension starts them, and runs a
    workflow on a store in memory, in the background (a fresh process: once per process). A run
    that began before that workflow skips it (the run does the same work), not the worker."""
    import subprocess
    import sys

    env = {**os.environ, "DURABLE_MONTY_DB": f"sqlite:///{tmp_path / 'warm.db'}"}
    command = [sys.executable, "-c", WARM_UP_PROBE, *(["run-first"] if run_first else [])]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    outcome, counts = done.stdout.strip().splitlines()[-2:]
    # the warm-up workflow ran and gave the right result, unless a run began first
    assert outcome == ("None False" if run_first else "None True")
    before, after = map(int, counts.split())
    assert before == 0 and after >= 1, done.stdout
    assert not list(tmp_path.iterdir())  # loading the extension never creates a store (or a key file)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("bad --workers 0", "workers must be a whole number of at least 1, not 0"),
        ("bad --retries -1", "retries must be 0 or more, not -1"),
        ("bad --retries 2 --delay -1", "delay must be a number of seconds, 0 or more, not -1.0"),
        ("bad --retries 2 --max-delay nan", "max_delay must be a number of seconds, 0 or more, not nan"),
        ("a::b", "a workflow name has at most 200 characters and no '::'"),
    ],
)
def test_options_out_of_range_are_refused_before_anything_runs(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str], tmp_path: Path, options: str, message: str
) -> None:
    from durable_monty_nb.store.store import Store

    result = shell.run_cell(f"%%durable {options}\ndoubled = await gather(*[double(i) for i in items])")
    assert not result.success
    err = capsys.readouterr()
    assert message in err.out + err.err and "Nothing ran." in err.out + err.err
    assert "magics.py" not in err.out + err.err
    assert "doubled" not in shell.user_ns
    store = tmp_path / "terminal.db"
    assert not store.exists() or Store(store).list_executions() == []
    assert shell.run_cell("%%durable good\nawait double(21)").result == 42  # the kernel stays usable


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("limits --timeout -1", "timeout must be a positive number of seconds, not -1.0"),
        ("limits --concurrency 0", "concurrency must be a whole number of at least 1, not 0"),
        ("limits --rate 0/s", "rate '0/s' must allow at least one call (N > 0)"),
        ("limits --rate quickly", "rate 'quickly' is not N/s, N/min or N/h"),
    ],
)
def test_call_limits_out_of_range_are_refused_before_anything_runs(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str], options: str, message: str
) -> None:
    result = shell.run_cell(f"%%durable {options}\ndoubled = await gather(*[double(i) for i in items])")
    assert not result.success
    err = capsys.readouterr()
    assert message in err.out + err.err and "Nothing ran." in err.out + err.err
    assert "doubled" not in shell.user_ns


def test_config_refuses_a_malformed_rate(shell: InteractiveShell, caplog: pytest.LogCaptureFixture) -> None:
    try:
        shell.run_line_magic("config", "DurableMagics.rate = '5 per second'")
        assert "DurableMagics.rate: rate '5 per second' is not N/s, N/min or N/h" in caplog.text
        assert shell.magics_manager.registry["DurableMagics"].rate is None
    finally:
        del shell.config.DurableMagics["rate"]  # IPython keeps the refused value in its config


def test_a_cell_timeout_and_config_limits(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_cell("import threading\nrelease = threading.Event()\ndef hang(x):\n    release.wait(60)\n    return x")
    code = "try:\n    await hang(1)\nexcept TimeoutError as e:\n    r = str(e)\nr"
    result = shell.run_cell(f"%%durable hung --timeout 0.2 --quiet\n{code}")
    assert "hang() did not finish within 0.2 s" in result.result
    shell.run_line_magic("config", "DurableMagics.timeout = 0.3")
    try:
        result = shell.run_cell(f"%%durable hung-config --quiet\n{code}")
        assert "hang() did not finish within 0.3 s" in result.result
    finally:
        shell.run_line_magic("config", "DurableMagics.timeout = None")
        shell.user_ns["release"].set()


def test_failed_run_names_cell_frames_as_ipython_does(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    shell.run_cell("def broken(x):\n    raise ValueError(f'no {x}')", store_history=True)
    result = shell.run_cell("%%durable broken-run\nawait broken(1)", store_history=True)
    assert not result.success
    err = capsys.readouterr()
    text = err.out + err.err
    assert re.search(r"Cell In\[\d+\], line 2, in broken", text)  # as IPython labels its own frames
    assert "<ipython-input-" not in text
    assert text.count("raise ValueError(f'no {x}')") == 1  # the traceback once (no copy from the view)


HELD = """
import threading
release = threading.Event()
started, running, peak = [], [0], [0]
lock = threading.Lock()


def held(i):
    with lock:
        started.append(i)
        running[0] += 1
        peak[0] = max(peak[0], running[0])
    release.wait(60)
    with lock:
        running[0] -= 1
    return i
"""


def _magics(shell: InteractiveShell) -> Any:
    return shell.magics_manager.registry["DurableMagics"]


def _until(predicate: Any, what: str) -> None:
    from procs import wait_until

    wait_until(predicate, timeout=30, what=what)


def test_durable_cancel_by_name_stops_a_background_run(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_cell(HELD)
    ns = shell.user_ns
    try:
        cell = "%%durable steps --background --quiet\nfirst = await held(1)\nsecond = await held(2)\nfirst + second"
        assert shell.run_cell(cell).success
        _until(lambda: ns["started"] == [1], "the first call to run")
        assert shell.run_cell("%durable_cancel steps").success
        assert "interrupting 'steps'" in capsys.readouterr().out
        ns["release"].set()  # the running call finishes and is kept; the next never starts
        store = _magics(shell).engine().store
        _until(lambda: store.latest_execution("steps").status == "interrupted", "the interruption")
        assert ns["started"] == [1] and store.latest_execution("steps").calls_done == 1
        refused = shell.run_cell("%durable_cancel steps")  # not running any more: said so, nothing changes
        assert not refused.success and "'steps' is not running in this kernel" in str(refused.error_in_exec)
        assert shell.run_cell("%durable_resume steps --quiet").result == 3
        assert ns["started"] == [1, 2]  # each call ran once
    finally:
        ns["release"].set()


def test_workers_option_caps_the_calls_running_at_once(shell: InteractiveShell) -> None:
    """``--workers 3``: a gather of 12 calls has exactly 3 running while the other 9 wait."""
    shell.run_cell(HELD)
    ns = shell.user_ns
    try:
        cell = "%%durable capped --workers 3 --background --quiet\nr = await gather(*[held(i) for i in range(12)])"
        assert shell.run_cell(cell).success
        (run,) = _magics(shell).engine().active_runs()
        # The moment chosen: all 12 calls handed to the executor, 3 of them running, 9 queued.
        _until(lambda: ns["running"][0] == 3 and run.progress.queued == 9, "3 calls running and 9 queued")
        assert ns["running"][0] == 3 and len(ns["started"]) == 3
        ns["release"].set()
        assert run.wait(30) and run.status == "completed"
        assert ns["peak"][0] == 3 and sorted(ns["started"]) == list(range(12))
    finally:
        ns["release"].set()


def test_durable_status_progress_is_done_over_the_total_the_code_tells(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """While a run goes on, the progress column says done/total only for a total the code tells
    (a gather, then one more call: 6), and marks the calls announced so far of a loop with ``+``."""
    import threading

    from procs import wait_until

    from durable_monty_nb.notebook.magics import _MAGICS

    gate = threading.Event()

    def slow(i: int) -> int:
        if i >= 2:
            gate.wait(30)
        return i

    shell.user_ns["slow"] = slow
    magics = _MAGICS[id(shell)]
    try:
        straight = "rs = await gather(*[slow(i) for i in range(5)])\nlast = await double(sum(rs))\nlast"
        assert shell.run_cell(f"%%durable straight --background --quiet\n{straight}").success
        loop = "acc = 0\nfor i in range(40):\n    acc = acc + await slow(i)\nacc"
        assert shell.run_cell(f"%%durable looping --background --quiet\n{loop}").success
        runs = magics.runs

        def done_of_announced(name: str) -> tuple[int, int]:
            progress = runs[name].progress  # one reading of both counts
            return progress.done, progress.total

        # Each run holds still once its call 2 is announced (it waits for the gate) and 2 are done.
        wait_until(lambda: done_of_announced("straight") == (2, 5), what="2 of the gather's 5 done")
        wait_until(lambda: done_of_announced("looping") == (2, 3), what="2 of the loop's 3 announced done")
        capsys.readouterr()
        shell.run_cell("%durable_status")
        table = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
        assert table["straight"][1:3] == ["running", "2/6"]  # 5 announced, the call after the gather known
        assert table["looping"][1:3] == ["running", "2/3+"]  # 3 announced; a loop says no more
        assert "calls: 2/3+ done" in repr(shell.run_line_magic("durable_status", "looping"))
    finally:
        gate.set()
    assert runs["straight"].wait(30) and runs["looping"].wait(30)
    shell.run_cell("%durable_status")
    table = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert table["straight"][1:3] == ["completed", "6/6"] and table["looping"][1:3] == ["completed", "40/40"]
