"""The notebook face in real Jupyter kernels: kill -9 mid-run, restart, resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kernels import Kernel
from procs import wait_until

from durable_monty_nb.store.store import Store

pytestmark = pytest.mark.kernel

DEFINE = """
import os, time

LOG = os.environ["SIDE_LOG"]
GATE = os.environ.get("GATE_FILE", "")


def work(i):
    with open(LOG, "a") as handle:
        handle.write(f"{os.getpid()} {i}\\n")
    while i >= 6 and GATE and os.path.exists(GATE):  # test scaffolding: hold calls 6.. while the gate exists
        time.sleep(0.01)
    return i * i


items = list(range(10))
"""
CELL = "%%durable squares\nvalues = await gather(*[work(i) for i in items])\ntotal = sum(values)\ntotal"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], Store]]:
    log, gate = tmp_path / "side.log", tmp_path / "gate"
    db = f"sqlite:///{tmp_path / 'notebook.db'}"
    env = {"SIDE_LOG": str(log), "GATE_FILE": str(gate), "DURABLE_MONTY_DB": db}
    yield tmp_path, env, Store(db)


def entries(tmp_path: Path) -> list[tuple[int, int]]:
    path = tmp_path / "side.log"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.exists() else []


def started_and_blocked(kernel: Kernel, tmp_path: Path, store: Store) -> None:
    """Run the durable cell with calls 6..9 held, until calls 0..5 are committed; then SIGKILL."""
    (tmp_path / "gate").touch()
    kernel.ok("%load_ext durable_monty_nb")
    kernel.ok(DEFINE)
    kernel.submit(CELL)
    wait_until(
        lambda: (
            (row := store.latest_execution("squares")) is not None
            and row.calls_done == 6
            and len(entries(tmp_path)) == 10
        ),
        what="6 committed calls and 4 held",
    )
    kernel.kill()
    (tmp_path / "gate").unlink()


def test_kill_kernel_mid_run_then_rerun_the_cells(setup: tuple[Path, dict[str, str], Store]) -> None:
    tmp_path, env, store = setup
    started_and_blocked(Kernel(tmp_path, env), tmp_path, store)
    first_pids = {pid for pid, _ in entries(tmp_path)}

    kernel = Kernel(tmp_path, env)
    try:
        loaded = kernel.ok("%load_ext durable_monty_nb")
        assert any("squares (crashed, 6/10 calls done" in d for d in loaded.displays)  # the Resume panel
        kernel.ok(DEFINE)
        reply = kernel.ok(CELL)
        assert reply.result == "285"
        # the widget's text form, as headless outputs keep it: the final status line
        assert "squares: completed · 10/10 calls done · 6 restored" in reply.displays
        assert any("6 restored" in text for text in reply.widget_text)  # the widget shows what came back
        assert kernel.ok("total, values[-1]").result == "(285, 81)"
    finally:
        kernel.close()
    again = sorted(i for pid, i in entries(tmp_path) if pid not in first_pids)
    assert again == [6, 7, 8, 9]  # only the calls in flight at the kill ran again


def test_resume_all_after_a_restart(setup: tuple[Path, dict[str, str], Store]) -> None:
    tmp_path, env, store = setup
    started_and_blocked(Kernel(tmp_path, env), tmp_path, store)
    first_pids = {pid for pid, _ in entries(tmp_path)}
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(DEFINE)
        kernel.ok("%durable_resume --all")
        assert kernel.ok("total").result == "285"
        assert "nothing to resume" in kernel.ok("%durable_resume --all").streams
    finally:
        kernel.close()
    assert sorted(i for pid, i in entries(tmp_path) if pid not in first_pids) == [6, 7, 8, 9]


def test_resume_button_of_the_load_ext_panel(setup: tuple[Path, dict[str, str], Store]) -> None:
    tmp_path, env, store = setup
    started_and_blocked(Kernel(tmp_path, env), tmp_path, store)
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(DEFINE)
        # Click the panel's Resume button as the browser would (its on_click handler runs).
        kernel.ok(
            "from ipywidgets import Button\n"
            "panel = get_ipython().find_cell_magic('durable').__self__.resume_panel\n"
            "buttons = [w for box in panel.children[1:] for w in box.children[0].children if isinstance(w, Button)]\n"
            "buttons[0].click()"
        )
        wait_until(lambda: kernel.ok("'total' in dir()").result == "True", what="the resumed run to export")
        assert kernel.ok("total, buttons[0].disabled").result == "(285, True)"
    finally:
        kernel.close()
    assert store.latest_execution("squares").status == "completed"


def test_resume_before_the_functions_are_defined_loses_nothing(
    setup: tuple[Path, dict[str, str], Store],
) -> None:
    tmp_path, env, store = setup
    started_and_blocked(Kernel(tmp_path, env), tmp_path, store)
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        reply = kernel.run(CELL)  # the cells defining work and items have not run yet
        assert reply.error == "UnknownNamesError"
        assert "'work' (line 1)" in reply.traceback and "Nothing was lost" in reply.traceback
        assert "durable_monty_nb/" not in reply.traceback  # no internal frames
        assert kernel.ok("1 + 1").result == "2"  # the kernel stays usable
        assert store.latest_execution("squares").calls_done == 6
        kernel.ok(DEFINE)
        assert kernel.ok(CELL).result == "285"
    finally:
        kernel.close()


def test_interrupt_stops_waiting_and_keeps_the_execution(setup: tuple[Path, dict[str, str], Store]) -> None:
    tmp_path, env, store = setup
    (tmp_path / "gate").touch()
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(DEFINE)
        msg_id = kernel.submit(CELL)
        wait_until(
            lambda: (row := store.latest_execution("squares")) is not None and row.calls_done == 6,
            what="6 committed calls",
        )
        kernel.manager.interrupt_kernel()
        reply = kernel.collect(msg_id)
        assert reply.error == "ExecutionInterrupted"
        assert "%durable_resume squares" in reply.traceback
        assert kernel.ok("1 + 1").result == "2"
        (tmp_path / "gate").unlink()  # the held calls finish in the background
        assert kernel.ok("%durable_resume squares").result == "285"
    finally:
        kernel.close()
    assert sorted(i for _, i in entries(tmp_path)) == list(range(10))  # every call ran exactly once


def test_background_cell_exports_names_when_done(setup: tuple[Path, dict[str, str], Store]) -> None:
    tmp_path, env, _ = setup
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(DEFINE)
        reply = kernel.ok(CELL.replace("squares", "squares --background"))
        assert reply.result is None
        wait_until(lambda: kernel.ok("'total' in dir()").result == "True", what="the names to be exported")
        assert kernel.ok("total").result == "285"
        status = kernel.ok("%durable_status").result or ""
        assert "squares" in status and "completed" in status and "10/10" in status
    finally:
        kernel.close()


def test_config_selects_the_store(setup: tuple[Path, dict[str, str], Store]) -> None:
    tmp_path, env, _ = setup
    other = tmp_path / "configured.db"
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(f"%config DurableMagics.db_url = {str(other)!r}")
        kernel.ok(DEFINE)
        kernel.ok(CELL)
    finally:
        kernel.close()
    assert Store(other).latest_execution("squares").status == "completed"


FLAKY = """
import os
LOG = os.environ["SIDE_LOG"]
FAIL = os.environ["GATE_FILE"]


def flaky(i):
    with open(LOG, "a") as handle:
        handle.write(f"{os.getpid()} {i}\\n")
    if i == 2 and os.path.exists(FAIL):
        raise ValueError(f"item {i} is broken")
    return i * i
"""
FLAKY_CELL = "%%durable flaky\nvalues = []\nfor i in range(4):\n    values.append(await flaky(i))\nsum(values)"
FIND_VIEW = (
    "m = get_ipython().find_cell_magic('durable').__self__\n"
    "view = next(v for k, v in m.views.items() if k.endswith({!r}))"
)


def test_a_failed_run_shows_its_traceback_once_and_retries_only_the_failed_calls(
    setup: tuple[Path, dict[str, str], Store],
) -> None:
    tmp_path, env, _ = setup
    (tmp_path / "gate").touch()  # here: call 2 fails while it exists
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")  # In[1]
        kernel.ok(FLAKY)  # In[2]
        reply = kernel.run(FLAKY_CELL)
        assert reply.error == "WorkflowFailed"
        # The function's frame reads as IPython's own, not as a temporary file.
        assert "Cell In[2], line 10, in flaky" in reply.traceback  # IPython strips the leading blank line
        assert "ipykernel_" not in reply.traceback
        # Once: the cell's error holds the workflow's traceback and the function's, each once;
        # nothing of it is printed besides, and the widget shows only one line.
        assert reply.traceback.count("Traceback (most recent call last)") == 2, reply.traceback
        assert reply.traceback.count('File "<workflow flaky>", line 3') == 1, reply.traceback
        assert reply.traceback.count("Cell In[2], line 10, in flaky") == 1, reply.traceback
        assert "is broken" not in reply.streams and not any("Traceback" in d for d in reply.displays)
        assert not any("raise ValueError" in text for text in reply.widget_text)
        assert any("(traceback below)" in text and "item 2 is broken" in text for text in reply.widget_text)

        (tmp_path / "gate").unlink()  # fixed
        shown = kernel.ok(FIND_VIEW.format("flaky") + "\nview._retry.layout.display, view._cancel.layout.display")
        assert shown.result == "('', 'none')"  # Retry failed shown, Cancel not (the cell waited for the run)
        kernel.ok("view._retry.click()")  # as the browser's click does
        wait_until(lambda: kernel.ok("'values' in dir()").result == "True", what="the retried run to export")
        assert kernel.ok("values").result == "[0, 1, 4, 9]"
    finally:
        kernel.close()
    assert sorted(i for _, i in entries(tmp_path)) == [0, 1, 2, 2, 3]  # only the failed call ran again


def test_cancel_button_of_a_background_run_and_calls_as_a_dataframe(
    setup: tuple[Path, dict[str, str], Store],
) -> None:
    tmp_path, env, store = setup
    (tmp_path / "gate").touch()
    kernel = Kernel(tmp_path, env)
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(DEFINE)
        kernel.ok("%%durable steps --background\nfirst = await work(7)\nsecond = await work(8)\nfirst + second")
        wait_until(lambda: [i for _, i in entries(tmp_path)] == [7], what="the first call to start (held)")
        shown = kernel.ok(FIND_VIEW.format("steps") + "\nview._cancel.layout.display")
        assert shown.result == "''"  # a background run can be cancelled from its widget
        kernel.ok("view._cancel.click()")  # as the browser's click does (the kernel is idle)
        (tmp_path / "gate").unlink()  # the running call finishes and is kept; the next never starts
        wait_until(lambda: store.latest_execution("steps").status == "interrupted", what="the interruption")
        assert [i for _, i in entries(tmp_path)] == [7]
        assert kernel.ok("%durable_resume steps").result == "113"

        frame = kernel.ok(
            "df = %durable_status steps --df\n"
            "str((list(df.columns), df.function.tolist(), df.arguments.tolist(), set(df.status), "
            "bool((df.end >= df.start).all() and (df.duration >= 0).all())))"
        )
        assert frame.result == repr(
            str(
                (
                    ["function", "arguments", "status", "attempts", "start", "end", "duration", "error", "worker"],
                    ["work", "work"],
                    ["7", "8"],
                    {"done"},
                    True,
                )
            )
        )
        assert kernel.run("%durable_status --df").error == "DurableError"
    finally:
        kernel.close()
    assert [i for _, i in entries(tmp_path)] == [7, 8]  # each call ran once
