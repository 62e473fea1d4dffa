"""In a real browser: **Retry failed** and **Resume**, clicked in JupyterLab (Chromium, Playwright).

One JupyterLab session (the session's shared server and Chromium, tests/shared_lab.py) over one
notebook written here, in a folder of this test alone, over that folder's empty store:

- a foreground cell fails on one call; its traceback shows in the cell, inside the widget. With
  the function fixed, **Retry failed** runs only the failed call, the run completes, the names
  are set, and the cell no longer ends in the red traceback;
- a background run is stopped by a kernel restart; the widgets the dead kernel left say they are
  detached (no broken-link icons, no buttons that would do nothing); ``%load_ext`` in the new
  kernel offers the run, and its **Resume** button continues it: the call in flight at the
  restart runs again, the finished one does not, the run completes and sets its names.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from procs import wait_until
from shared_lab import _log_tail
from test_browser import ARTIFACTS, KERNEL_READY_MS, WIDGET_MS, expect, find_panel, notebook_errors, notebook_ready
from test_browser_signals import ran_js, run_js

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

NOTEBOOK_NAME = "approval.ipynb"
LOAD, DEFINE, FLAKY, PRINT_VALUES, STEPS, PRINT_RS = range(6)


def _cells(log: Path, fail: Path, gate: Path) -> list[str]:
    return [
        "%load_ext durable_monty_nb",
        "import os, time\n\n\ndef flaky(i):\n"
        f"    with open({str(log)!r}, 'a') as handle:\n"
        "        handle.write(f'flaky {i}\\n')\n"
        f"    if i == 2 and os.path.exists({str(fail)!r}):\n"
        "        raise ValueError(f'item {i} is broken')\n"
        "    return i * i\n\n\ndef step(i):\n"
        f"    with open({str(log)!r}, 'a') as handle:\n"
        "        handle.write(f'step {i}\\n')\n"
        f"    while i == 1 and not os.path.exists({str(gate)!r}):\n"
        "        time.sleep(0.01)\n"
        "    return i + 10",
        "%%durable flaky\nvalues = []\nfor i in range(4):\n    values.append(await flaky(i))\nsum(values)",
        'print("values:", values)',
        "%%durable steps --background --workers 1\nrs = []\nfor i in range(3):\n    rs.append(await step(i))\nsum(rs)",
        'print("rs:", rs)',
    ]


def _write_notebook(path: Path, cells: list[str]) -> None:
    nb = {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": f"cell{i}", "metadata": {}, "outputs": [], "source": s}
            for i, s in enumerate(cells)
        ],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")


@pytest.fixture
def retry_lab(lab_folder: Any, tmp_path: Path) -> dict[str, Any]:
    files = {"calls": tmp_path / "calls.log", "fail": tmp_path / "fail", "gate": tmp_path / "gate"}
    files["fail"].touch()  # flaky(2) fails while it exists
    _write_notebook(lab_folder.root / NOTEBOOK_NAME, _cells(files["calls"], files["fail"], files["gate"]))
    return {
        "url": lab_folder.tree_url(NOTEBOOK_NAME),
        "path": lab_folder.path(NOTEBOOK_NAME),
        "log": lab_folder.log,
        "db": lab_folder.db_url,
        **files,
    }


def ran(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _run(browser: Any, path: str, command: str, index: int, count: int) -> None:
    browser.evaluate(run_js(path), [command, index])
    browser.wait_for_function(ran_js(path), arg=count, timeout=60_000)
    assert browser.evaluate("() => window.__durableRan") == "ok"


def _status(db: str, name: str) -> tuple[str, int] | None:
    store = sa.create_engine(db)
    try:
        with store.connect() as conn:
            row = conn.execute(
                sa.text("SELECT status, calls_done FROM dm_executions WHERE key LIKE :key ORDER BY created_at DESC"),
                {"key": f"%{name}"},
            ).first()
    finally:
        store.dispose()
    return None if row is None else (row.status, row.calls_done)


def restart_kernel(path: str) -> str:
    """JavaScript: restart the kernel of the notebook at ``path``; ``window.__durableRestarted`` says how."""
    return f"""() => {{
    {find_panel(path)}
    window.__durableRestarted = undefined;
    panel.sessionContext.session.kernel.restart().then(
        () => {{ window.__durableRestarted = 'ok'; }}, err => {{ window.__durableRestarted = 'failed: ' + err; }});
}}"""


# The widget views that show JupyterLab's broken-link icon (a ::before with content) in durable widgets.
BROKEN_LINK_ICONS = """() => Array.from(document.querySelectorAll(
        '.durable-run.jupyter-widgets-disconnected, .durable-run .jupyter-widgets-disconnected'))
    .filter(el => !['none', 'normal', ''].includes(getComputedStyle(el, '::before').content)).length"""
DISCONNECTED_WIDGETS = "() => document.querySelectorAll('.durable-run.jupyter-widgets-disconnected').length"


def test_retry_failed_and_resume_clicked_in_jupyterlab(retry_lab: dict[str, Any], page: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    log, path = retry_lab["calls"], retry_lab["path"]
    cells = page.locator(".jp-Notebook .jp-Cell")
    try:
        page.goto(retry_lab["url"], wait_until="domcontentloaded")
        page.wait_for_function(notebook_ready(path), timeout=KERNEL_READY_MS)

        # 1. The foreground cell fails at flaky(2): its traceback shows, in the widget.
        _run(page, path, "notebook:run-all-above", PRINT_VALUES, FLAKY + 1)
        cell = cells.nth(FLAKY)
        widget = cell.locator(".durable-run")
        expect(widget.locator(".durable-status")).to_have_text("failed", timeout=WIDGET_MS)
        expect(cell.locator(".jp-Cell-outputArea")).to_contain_text("ValueError: item 2 is broken", timeout=WIDGET_MS)
        expect(widget).to_contain_text("Traceback")  # the cell's traceback, captured in the widget
        page.screenshot(path=str(ARTIFACTS / "retry-failed.png"), full_page=True)
        assert ran(log) == ["flaky 0", "flaky 1", "flaky 2"]

        # 2. Fixed, Retry failed: only the failed call runs again, the run completes, the traceback goes.
        retry_lab["fail"].unlink()
        widget.locator("button", has_text="Retry failed").click()
        expect(widget.locator(".durable-status")).to_have_text("completed", timeout=WIDGET_MS)
        expect(widget).to_contain_text(re.compile(r"(^|\D)4/4 done"), timeout=WIDGET_MS)
        expect(cell.locator(".jp-Cell-outputArea")).not_to_contain_text("is broken", timeout=WIDGET_MS)
        expect(cell.locator(".jp-Cell-outputArea")).not_to_contain_text("Traceback")
        expect(widget.locator("button", has_text="Retry failed")).to_be_hidden()
        assert page.evaluate(notebook_errors(path)) == []  # no cell ends in an error
        assert ran(log) == ["flaky 0", "flaky 1", "flaky 2", "flaky 2", "flaky 3"]
        page.screenshot(path=str(ARTIFACTS / "retry-completed.png"), full_page=True)
        _run(page, path, "notebook:run-cell", PRINT_VALUES, PRINT_VALUES + 1)
        expect(cells.nth(PRINT_VALUES).locator(".jp-OutputArea-output")).to_have_text("values: [0, 1, 4, 9]")

        # 3. A background run, stopped by a kernel restart while step(1) runs (step(0) committed).
        _run(page, path, "notebook:run-cell", STEPS, STEPS + 1)
        wait_until(lambda: _status(retry_lab["db"], "steps") == ("running", 1), what="step(0) committed")
        wait_until(lambda: "step 1" in ran(log), what="step(1) running")
        page.evaluate(restart_kernel(path))
        page.wait_for_function("() => window.__durableRestarted !== undefined", timeout=KERNEL_READY_MS)
        assert page.evaluate("() => window.__durableRestarted") == "ok"
        page.wait_for_function(notebook_ready(path), timeout=KERNEL_READY_MS)

        # The dead kernel's widgets say they are detached: no broken-link icons, no dead buttons.
        page.wait_for_function(f"() => ({DISCONNECTED_WIDGETS})() === 2", timeout=WIDGET_MS)
        for index in (FLAKY, STEPS):
            old = cells.nth(index).locator(".durable-run")
            expect(old.locator(".durable-detached")).to_be_visible()
            expect(old.locator(".durable-detached")).to_contain_text("detached from its kernel")
            expect(old.locator("button:visible")).to_have_count(0)
        assert page.evaluate(BROKEN_LINK_ICONS) == 0
        cells.nth(STEPS).scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "detached-widgets.png"), full_page=True)

        # 4. The new kernel: %load_ext offers the run; its Resume button continues it.
        retry_lab["gate"].touch()
        _run(page, path, "notebook:run-all-above", FLAKY, DEFINE + 1)
        banner = cells.nth(LOAD)
        expect(banner).to_contain_text("Unfinished durable executions", timeout=WIDGET_MS)
        expect(banner).to_contain_text(re.compile(r"steps \(\w+, 1/2 calls done"))
        banner.locator("button", has_text="Resume").click()
        resumed = banner.locator(".durable-run")
        expect(resumed.locator(".durable-status")).to_have_text("completed", timeout=WIDGET_MS)
        expect(resumed).to_contain_text(re.compile(r"(^|\D)3/3 done"))
        expect(banner.locator("button", has_text="Resume")).to_be_hidden(timeout=WIDGET_MS)
        expect(banner).to_contain_text("Resumed durable executions")
        page.screenshot(path=str(ARTIFACTS / "resume-completed.png"), full_page=True)
        assert _status(retry_lab["db"], "steps") == ("completed", 3)
        steps = [line for line in ran(log) if line.startswith("step")]
        assert steps == ["step 0", "step 1", "step 1", "step 2"]  # only the call in flight ran again
        _run(page, path, "notebook:run-cell", PRINT_RS, PRINT_RS + 1)
        expect(cells.nth(PRINT_RS).locator(".jp-OutputArea-output")).to_have_text("rs: [10, 11, 12]")
    except BaseException:
        print(f"JupyterLab log:\n{_log_tail(retry_lab['log'])}")
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / "retry-resume-failure.png"), full_page=True)
        raise
