"""Beside a thread that keeps the GIL (a notebook function looping in pure Python), a running
workflow makes the interpreter switch threads more often, so it is not held off for 5 ms at every
wait (see durable_monty_nb/engine/driver/switching.py and benchmarks/bench_switching.py)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from procs import wait_until

from durable_monty_nb import Engine, Run, defaults, set_switch_interval

PYTHONS = 0.005  # Python's own default


@pytest.fixture(autouse=True)
def pythons_interval() -> Iterator[None]:
    from durable_monty_nb.engine.driver import switching

    # The interval is the process's: a driver of an earlier test still running (riding out a
    # store outage, say) keeps it lowered, and these tests count the drivers of their own.
    wait_until(lambda: switching._running == 0, timeout=120, what="the drivers of earlier tests to end")
    before = sys.getswitchinterval()
    sys.setswitchinterval(PYTHONS)
    yield
    set_switch_interval(defaults.SWITCH_INTERVAL)
    sys.setswitchinterval(before)


@pytest.fixture
def engine(sqlite_engine: Engine) -> Engine:
    return sqlite_engine  # conftest's: runs still active at the end are interrupted


@pytest.fixture
def busy() -> Iterator[None]:
    """A thread of the process looping in pure Python, as a CPU-bound notebook function would."""
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)


STEPS = 1000
"""A bound on the awaits a run makes until its driver has seen the busy thread: the driver measures
the contention, in a few steps on a quiet machine, in dozens on a loaded one (20 were too few)."""


def awaits_until(function: str, flag: str) -> str:
    """Workflow code: await ``function(i)`` for i = 0, 1, ... until it returns True (in ``flag``)
    or ``STEPS`` calls were made."""
    return (
        f"{flag} = await {function}(0)\ni = 1\n"
        f"while not {flag} and i < {STEPS}:\n    {flag} = await {function}(i)\n    i = i + 1\n"
    )


def held_run(engine: Engine, key: str, *, until_seen: bool = True) -> tuple[Run, threading.Event]:
    """A run that awaited calls until its driver saw the busy thread (whether or not that changed
    the interval), or 20 calls without ``until_seen``, and now waits for the returned event in its
    last call."""
    from durable_monty_nb.engine.driver import switching

    entered, release = threading.Event(), threading.Event()

    def hold(x: bool) -> bool:
        entered.set()
        release.wait(60)
        return x

    def step(x: int) -> bool:
        return switching.lowered  # set by the driver's thread before it dispatched this call

    code = awaits_until("step", "seen") if until_seen else "for i in range(20):\n    await step(i)\nseen = True\n"
    code += "await hold(seen)"
    run = engine.start(code, {"hold": hold, "step": step}, key=key)
    assert entered.wait(120), "the call did not start"
    return run, release


def finish(run: Run, release: threading.Event) -> None:
    release.set()
    assert run.result(30) is True, f"the driver did not see the busy thread in {STEPS} awaits"


def test_beside_a_busy_thread_runs_lower_the_interval_until_the_last_of_them_ends(engine: Engine, busy: None) -> None:
    first, release_first = held_run(engine, "first")
    assert sys.getswitchinterval() == pytest.approx(defaults.SWITCH_INTERVAL)
    second, release_second = held_run(engine, "second")
    finish(first, release_first)
    assert sys.getswitchinterval() == pytest.approx(defaults.SWITCH_INTERVAL)  # the second still runs
    finish(second, release_second)
    assert sys.getswitchinterval() == pytest.approx(PYTHONS)


def test_an_interval_changed_during_a_run_is_kept(engine: Engine, busy: None) -> None:
    run, release = held_run(engine, "changed")
    sys.setswitchinterval(0.002)
    finish(run, release)
    assert sys.getswitchinterval() == pytest.approx(0.002)


def test_none_leaves_pythons_interval_alone(engine: Engine, busy: None) -> None:
    set_switch_interval(None)
    run, release = held_run(engine, "alone")
    assert sys.getswitchinterval() == pytest.approx(PYTHONS)
    finish(run, release)
    assert sys.getswitchinterval() == pytest.approx(PYTHONS)


def test_an_interval_already_shorter_is_not_raised(engine: Engine, busy: None) -> None:
    sys.setswitchinterval(0.0001)
    # At 0.1 ms the busy thread hands the GIL over at once: the driver may see no contention.
    run, release = held_run(engine, "shorter", until_seen=False)
    assert sys.getswitchinterval() == pytest.approx(0.0001)
    finish(run, release)
    assert sys.getswitchinterval() == pytest.approx(0.0001)


@pytest.mark.parametrize("value", [0, -1, 2])
def test_an_interval_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1 second, or None"):
        set_switch_interval(value)


def test_the_magics_option_sets_it_and_refuses_nonsense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, busy: None
) -> None:
    monkeypatch.setenv("DURABLE_MONTY_DB", f"sqlite:///{tmp_path / 'switching.db'}")
    shell: Any = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "durable_monty_nb")
    try:
        shell.run_line_magic("config", "DurableMagics.switch_interval = 5")
        assert "DurableMagics.switch_interval: the switch interval must be between 0 and 1 second" in caplog.text
        del shell.config.DurableMagics["switch_interval"]  # IPython keeps the refused value in its config
        shell.run_line_magic("config", "DurableMagics.switch_interval = 0.001")
        look = "def look(x):\n    seen.append(sys.getswitchinterval())\n    return seen[-1] == 0.001"
        shell.run_cell("import sys\nseen = []\n" + look)
        body = awaits_until("look", "lowered") + "lowered"  # not `seen`: the cell's outputs reach the shell
        result = shell.run_cell("%%durable look --quiet\n" + body)
        assert result.result is True, f"no call ran at the configured interval in {STEPS} awaits"
        assert set(shell.user_ns["seen"]) <= {PYTHONS, 0.001}  # Python's until lowered, then the option's
        assert sys.getswitchinterval() == pytest.approx(PYTHONS)
    finally:
        shell.run_line_magic("config", "DurableMagics.switch_interval = None")
        shell.run_line_magic("unload_ext", "durable_monty_nb")


def test_a_parked_run_puts_the_interval_back_while_it_waits_for_its_signal(engine: Engine, busy: None) -> None:
    def step(x: int) -> int:
        return x

    code = 'for i in range(20):\n    await step(i)\nv = await signal("go")\nv + 1'
    run = engine.start(code, {"step": step}, key="parked")
    wait_until(lambda: run.parked, what="the run to park")
    assert sys.getswitchinterval() == pytest.approx(PYTHONS)
    engine.signal("parked", "go", 41)
    assert run.result(30) == 42
    assert sys.getswitchinterval() == pytest.approx(PYTHONS)


def test_the_collector_is_paused_while_any_driver_works_and_only_then() -> None:
    """Pauses nest (several drivers), the last one enables the collector again, and a program that
    disabled it keeps it disabled (durable_monty_nb/engine/driver/collecting.py)."""
    import gc

    from durable_monty_nb.engine.driver import collecting

    assert gc.isenabled()
    with collecting.paused():
        assert not gc.isenabled()
        with collecting.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collecting.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
