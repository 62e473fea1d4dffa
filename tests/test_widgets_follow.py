"""Widgets follow their execution, in a real kernel: Retry failed turns the failed run's widget into
the retry's (no second widget), the widget a failed run left follows the run of the fixed cell,
and the %load_ext panel lets go of a workflow once it completed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from kernels import Kernel
from procs import wait_until

from durable_monty_nb import Engine

FLAKY = """
import os

def flaky(i):
    failing = os.environ["FAIL_FILE"]
    if os.path.exists(failing) and open(failing).read() == str(i):
        raise ValueError(f"item {i} is broken")
    return i * i
"""
CELL = "%%durable flaky\nvalues = []\nfor i in range(4):\n    values.append(await flaky(i))\nsum(values)"
MAGICS = "m = get_ipython().find_cell_magic('durable').__self__"


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    (tmp_path / "fail").write_text("2")  # flaky(2) fails while the file says so
    started = Kernel(
        tmp_path, {"DURABLE_MONTY_DB": f"sqlite:///{tmp_path / 'store.db'}", "FAIL_FILE": str(tmp_path / "fail")}
    )
    yield started
    started.close()


@pytest.mark.kernel
def test_retry_failed_and_a_fixed_cell_are_followed_by_the_failed_runs_widget(kernel: Kernel, tmp_path: Path) -> None:
    kernel.ok("%load_ext durable_monty_nb")
    kernel.ok(FLAKY)
    assert kernel.run(CELL).error == "WorkflowFailed"
    kernel.ok(f"{MAGICS}\nview = m.views['flaky']\nfirst = view.run")
    (tmp_path / "fail").unlink()  # fixed

    clicked = kernel.ok("view._retry.click()")
    assert clicked.displays == []  # no second widget: the failed run's widget follows the retry
    wait_until(lambda: kernel.ok("view.run.status").result == "'completed'", what="the retry to complete")
    assert kernel.ok("view.run is not first, m.views['flaky'] is view, values").result == "(True, True, [0, 1, 4, 9])"
    assert "retrying the failed calls" in kernel.ok("view._note.value").result
    assert kernel.ok("view._retry.layout.display, view._error.value").result == "('none', '')"

    # Fail again (a call not run yet), fix, run the cell again: the earlier widget says what became of it.
    (tmp_path / "fail").write_text("4")
    cell = CELL.replace("range(4)", "range(5)")
    assert kernel.run(cell).error == "WorkflowFailed"
    kernel.ok("old = m.views['flaky']")
    (tmp_path / "fail").unlink()
    assert kernel.ok(cell).result == "30"
    assert kernel.ok("old.run is m.views['flaky'].run, old.run.status").result == "(True, 'completed')"
    assert "continued by a new run of flaky" in kernel.ok("old._note.value").result


@pytest.mark.kernel
def test_the_load_ext_panel_lets_go_of_a_workflow_that_completed(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'store.db'}"
    release = threading.Event()

    def slow(i: int) -> int:
        release.wait(30)
        return i

    engine = Engine(db)
    code = "r = await slow(1)\nr + await slow(2)"
    run = engine.start(code, {"slow": slow}, key="left")
    run.cancel()
    release.set()
    assert run.wait(30) and run.status == "interrupted"
    engine.close()

    kernel = Kernel(tmp_path, {"DURABLE_MONTY_DB": db})
    try:
        loaded = kernel.ok("%load_ext durable_monty_nb")
        assert any("left (interrupted" in text for text in loaded.displays)
        kernel.ok(f"{MAGICS}\ndef slow(i):\n    return i")
        assert kernel.ok("m.resume_panel.layout.display, sorted(m._banner_items)").result == "(None, ['left'])"
        assert kernel.ok(f"%%durable left\n{code}").result == "3"
        assert kernel.ok("m.resume_panel.layout.display, sorted(m._banner_items)").result == "('none', [])"
    finally:
        kernel.close()
