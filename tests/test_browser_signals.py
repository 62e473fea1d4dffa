"""In a real browser: a %%durable cell parks on three signals in turn; clicking **Approve**, then
**Reject**, then typing a JSON value and clicking **Send** in its widget in JupyterLab completes
the run (a value that is not JSON is refused in the widget, and nothing is delivered).

The session's headless JupyterLab (tests/shared_lab.py; this module reuses tests/test_browser.py's
helpers) serves a small notebook written here, in a folder of each test alone, against that
folder's empty SQLite store; Playwright drives Debian's Chromium. Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from shared_lab import _log_tail
from test_browser import (
    ARTIFACTS,
    KERNEL_READY_MS,
    WIDGET_MS,
    expect,
    find_panel,
    notebook_errors,
    notebook_ready,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

NOTEBOOK_NAME = "approval.ipynb"
CELLS = [
    "%load_ext durable_monty_nb",
    "def record(decision, review, note):\n"
    "    return f\"recorded {decision['approved']} {review['approved']} {note['note']}\"",
    '%%durable approval\ndecision = await signal("approval")\nreview = await signal("review")\n'
    'note = await signal("note")\noutcome = await record(decision, review, note)\noutcome',
    'print("outcome:", outcome)',
]
DURABLE_CELL = 2


# Run the cells above cell `index` (notebook:run-all-above), or cell `index` alone (notebook:run-cell),
# of the notebook at ``path``.
def run_js(path: str) -> str:
    return f"""([command, index]) => {{
    {find_panel(path)}
    app.shell.activateById(panel.id);
    app.shell.collapseLeft();
    panel.content.activeCellIndex = index;
    window.__durableRan = undefined;
    app.commands.execute(command).then(
        ok => {{ window.__durableRan = 'ok'; }},
        err => {{ window.__durableRan = 'failed: ' + err; }});
}}"""


def ran_js(path: str) -> str:
    """JavaScript: true once the command of ``run_js`` ended and the first ``count`` code cells ran."""
    return f"""(count) => {{
    if (window.__durableRan === undefined) return false;
    {find_panel(path)}
    const cells = Array.from(panel.content.widgets).filter(c => c.model.type === 'code').slice(0, count);
    return panel.sessionContext.session.kernel.status === 'idle'
        && cells.every(c => c.model.executionCount !== null);
}}"""


def _write_notebook(path: Path, sources: list[str] = CELLS) -> None:
    cells = [
        {"cell_type": "code", "execution_count": None, "id": f"cell{i}", "metadata": {}, "outputs": [], "source": src}
        for i, src in enumerate(sources)
    ]
    nb = {
        "cells": cells,
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")


def _lab(folder: Any) -> dict[str, Any]:
    """What the tests use of their folder of the shared JupyterLab."""
    path = folder.path(NOTEBOOK_NAME)
    return {"url": folder.tree_url(NOTEBOOK_NAME), "path": path, "log": folder.log, "db": folder.db_url}


@pytest.fixture
def signal_lab(lab_folder: Any) -> dict[str, Any]:
    """The shared headless JupyterLab, serving the approval notebook over an empty store."""
    _write_notebook(lab_folder.root / NOTEBOOK_NAME)
    return _lab(lab_folder)


# The same notebook's name, with a detached cell: a runner subprocess drives it, the widget watches the store.
DETACHED_CELLS = [
    "%load_ext durable_monty_nb",
    "def record(decision, review):\n    return f\"recorded {decision['approved']} {review['approved']}\"",
    '%%durable approval --detach\ndecision = await signal("approval")\nreview = await signal("review")\n'
    "outcome = await record(decision, review)\noutcome",
    'print("outcome:", outcome)',
]


@pytest.fixture
def detached_lab(lab_folder: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The shared headless JupyterLab serving the detached notebook, and a ``durable-monty-nb runner``
    subprocess (test_detach's) of its store, polling signals every second (lease 3 s)."""
    from test_detach import Runners

    _write_notebook(lab_folder.root / NOTEBOOK_NAME, DETACHED_CELLS)
    lab = _lab(lab_folder)
    runners = Runners(lab["db"], tmp_path)
    try:
        yield {**lab, "runners": runners}
    finally:
        runners.stop()


def _run(browser: Any, path: str, command: str, index: int, count: int) -> None:
    browser.evaluate(run_js(path), [command, index])
    browser.wait_for_function(ran_js(path), arg=count, timeout=60_000)
    assert browser.evaluate("() => window.__durableRan") == "ok"


def _names_landed(browser: Any, path: str, count: int, printed: str) -> None:
    """Run the cell after the durable one: it prints the names the run set in the notebook."""
    _run(browser, path, "notebook:run-cell", DURABLE_CELL + 1, count)
    assert browser.evaluate(notebook_errors(path)) == []
    output = browser.locator(".jp-Notebook .jp-Cell").nth(DURABLE_CELL + 1).locator(".jp-OutputArea-output")
    expect(output).to_have_text(printed, timeout=WIDGET_MS)


def _stored(db: str, *extra: str) -> tuple[list[tuple[str, Any, str, int]], list[Any]]:
    """The store's deliveries (name, value, source, consumed by) and the values of ``extra`` queries."""
    store = sa.create_engine(db)
    with store.connect() as conn:
        rows = conn.execute(sa.text("SELECT name, value, source, consumed_by FROM dm_signals")).all()
        values = [conn.execute(sa.text(query)).scalar_one() for query in extra]
    store.dispose()
    return [(r.name, json.loads(r.value), r.source, r.consumed_by) for r in rows], values


def test_approve_reject_and_send_buttons_complete_a_parked_run(signal_lab: dict[str, Any], page: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    failure_shot = ARTIFACTS / "approval-failure.png"
    failure_shot.unlink(missing_ok=True)
    try:
        path = signal_lab["path"]
        page.goto(signal_lab["url"], wait_until="domcontentloaded")
        page.wait_for_function(notebook_ready(path), timeout=KERNEL_READY_MS)

        # Run the cells up to the %%durable one: it parks on the signal and the cell returns.
        _run(page, path, "notebook:run-all-above", DURABLE_CELL + 1, DURABLE_CELL + 1)
        assert page.evaluate(notebook_errors(path)) == []
        cell = page.locator(".jp-Notebook .jp-Cell").nth(DURABLE_CELL)
        widget = cell.locator(".durable-run")
        expect(widget).to_have_count(1, timeout=WIDGET_MS)
        expect(widget.locator(".durable-status")).to_have_text("waiting for 'approval'", timeout=WIDGET_MS)  # no ETA
        expect(widget.locator(".durable-waiting")).to_have_text("waiting for signal 'approval'", timeout=WIDGET_MS)
        approve = widget.locator(".durable-approve")
        expect(approve).to_be_visible(timeout=WIDGET_MS)
        cell.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "approval-waiting.png"), full_page=True)

        approve.click()

        waiting = widget.locator(".durable-waiting")
        expect(waiting).to_have_text("waiting for signal 'review'", timeout=WIDGET_MS)
        widget.locator(".durable-reject").click()

        expect(waiting).to_have_text("waiting for signal 'note'", timeout=WIDGET_MS)
        field = widget.locator(".durable-signal-value input")
        field.fill("{not json")
        widget.locator(".durable-send").click()
        expect(widget.locator(".durable-signal-error")).to_contain_text("not JSON", timeout=WIDGET_MS)
        field.fill('{"note": "ok"}')
        widget.locator(".durable-send").click()

        expect(widget.locator(".durable-status")).to_have_text("completed", timeout=WIDGET_MS)
        expect(widget).to_contain_text(re.compile(r"(^|\D)4/4 done"), timeout=WIDGET_MS)  # the 3 waits and record()
        expect(widget.locator(".durable-approve")).to_have_count(0, timeout=WIDGET_MS)  # nothing to approve now
        page.screenshot(path=str(ARTIFACTS / "approval-completed.png"), full_page=True)

        # The run's names landed in the notebook when it completed.
        _names_landed(page, path, len(CELLS), "outcome: recorded True False ok")

        # In the store: three deliveries (none of the refused text), from the widget, each consumed by its wait.
        deliveries, [status] = _stored(signal_lab["db"], "SELECT status FROM dm_executions")
        assert deliveries == [
            ("approval", {"approved": True}, "widget", 0),
            ("review", {"approved": False}, "widget", 1),
            ("note", {"note": "ok"}, "widget", 2),
        ]
        assert status == "completed"
    except BaseException:
        print(f"JupyterLab log:\n{_log_tail(signal_lab['log'])}")
        with contextlib.suppress(Exception):  # keep the original error
            page.screenshot(path=str(failure_shot), full_page=True)
        raise


def test_approve_and_reject_buttons_of_a_watched_run_that_a_runner_drives(
    detached_lab: dict[str, Any],
    page: Any,
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    failure_shot = ARTIFACTS / "detached-approval-failure.png"
    failure_shot.unlink(missing_ok=True)
    runners = detached_lab["runners"]
    try:
        path = detached_lab["path"]
        page.goto(detached_lab["url"], wait_until="domcontentloaded")
        page.wait_for_function(notebook_ready(path), timeout=KERNEL_READY_MS)
        _run(page, path, "notebook:run-all-above", DURABLE_CELL + 1, DURABLE_CELL + 1)  # handed over: returns at once
        assert page.evaluate(notebook_errors(path)) == []
        runner = runners.start("lab-runner", "--lease-ttl", "3")
        cell = page.locator(".jp-Notebook .jp-Cell").nth(DURABLE_CELL)
        widget = cell.locator(".durable-run")
        expect(widget).to_have_count(1, timeout=WIDGET_MS)
        waiting = widget.locator(".durable-waiting")
        expect(waiting).to_have_text("waiting for signal 'approval'", timeout=WIDGET_MS)  # as the runner's run waits
        cell.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "detached-approval-waiting.png"), full_page=True)

        widget.locator(".durable-approve").click()
        expect(waiting).to_have_text("waiting for signal 'review'", timeout=WIDGET_MS)
        widget.locator(".durable-reject").click()

        expect(widget.locator(".durable-status")).to_have_text("completed", timeout=WIDGET_MS)
        expect(widget).to_contain_text(re.compile(r"(^|\D)3/3 done"), timeout=WIDGET_MS)
        expect(widget.locator(".durable-approve")).to_have_count(0, timeout=WIDGET_MS)
        page.screenshot(path=str(ARTIFACTS / "detached-approval-completed.png"), full_page=True)

        _names_landed(page, path, len(DETACHED_CELLS), "outcome: recorded True False")

        deliveries, [status, driver] = _stored(
            detached_lab["db"], "SELECT status FROM dm_executions", "SELECT runner FROM dm_handoffs"
        )
        assert deliveries == [
            ("approval", {"approved": True}, "widget", 0),
            ("review", {"approved": False}, "widget", 1),
        ]
        assert status == "completed" and driver == "lab-runner"
        assert "approval.ipynb::approval' (" in runners.output("lab-runner") and runner.poll() is None
    except BaseException:
        print(f"JupyterLab log:\n{_log_tail(detached_lab['log'])}")
        with contextlib.suppress(Exception):
            print(f"runner log:\n{runners.output('lab-runner')}")
            page.screenshot(path=str(failure_shot), full_page=True)
        raise
