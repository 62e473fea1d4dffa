"""In a real browser: a %%durable cell parks on three signals in turn; clicking **Approve**, then
**Reject**, then typing a JSON value and clicking **Send** in its widget in JupyterLab completes
the run (a value that is not JSON is refused in the widget, and nothing is delivered).

A headless JupyterLab (the same setup as tests/test_browser.py, whose helpers and ``page``
fixture this module reuses) serves a small notebook written here against an empty SQLite store;
Playwright drives Debian's Chromium. Screenshots land in test-artifacts/.
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
from test_browser import (
    ARTIFACTS,
    KERNEL_READY_MS,
    WIDGET_MS,
    _log_tail,
    expect,
    find_panel,
    notebook_errors,
    notebook_ready,
    page,  # noqa: F401 - a fixture: Chromium, 1280x900
    serve_lab,
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

FIND_PANEL = find_panel(NOTEBOOK_NAME)
NOTEBOOK_READY = notebook_ready(NOTEBOOK_NAME)
# Run the cells above cell `index` (notebook:run-all-above), or cell `index` alone (notebook:run-cell).
RUN = f"""([command, index]) => {{
    {FIND_PANEL}
    app.shell.activateById(panel.id);
    app.shell.collapseLeft();
    panel.content.activeCellIndex = index;
    window.__durableRan = undefined;
    app.commands.execute(command).then(
        ok => {{ window.__durableRan = 'ok'; }},
        err => {{ window.__durableRan = 'failed: ' + err; }});
}}"""
RAN = f"""(count) => {{
    if (window.__durableRan === undefined) return false;
    {FIND_PANEL}
    const cells = Array.from(panel.content.widgets).filter(c => c.model.type === 'code').slice(0, count);
    return panel.sessionContext.session.kernel.status === 'idle'
        && cells.every(c => c.model.executionCount !== null);
}}"""
NOTEBOOK_ERRORS = notebook_errors(NOTEBOOK_NAME)


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


@pytest.fixture
def signal_lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A headless JupyterLab on a free port, serving the approval notebook over an empty store."""
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / NOTEBOOK_NAME)
    db = tmp_path / "signals.db"
    with serve_lab(tmp_path, root, db) as (base_url, log):
        yield {"url": base_url, "log": log, "db": f"sqlite:///{db}"}


# The same notebook's name, with a detached cell: a runner subprocess drives it, the widget watches the store.
DETACHED_CELLS = [
    "%load_ext durable_monty_nb",
    "def record(decision, review):\n    return f\"recorded {decision['approved']} {review['approved']}\"",
    '%%durable approval --detach\ndecision = await signal("approval")\nreview = await signal("review")\n'
    "outcome = await record(decision, review)\noutcome",
    'print("outcome:", outcome)',
]


@pytest.fixture
def detached_lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A headless JupyterLab serving the detached notebook, and a ``durable-monty-nb runner``
    subprocess (test_detach's) of its store, polling signals every second (lease 3 s)."""
    from test_detach import Runners

    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / NOTEBOOK_NAME, DETACHED_CELLS)
    db = tmp_path / "detached.db"
    runners = Runners(f"sqlite:///{db}", tmp_path)
    try:
        with serve_lab(tmp_path, root, db) as (base_url, log):
            yield {"url": base_url, "log": log, "db": f"sqlite:///{db}", "runners": runners}
    finally:
        runners.stop()


def _run(browser: Any, command: str, index: int, count: int) -> None:
    browser.evaluate(RUN, [command, index])
    browser.wait_for_function(RAN, arg=count, timeout=60_000)
    assert browser.evaluate("() => window.__durableRan") == "ok"


def _names_landed(browser: Any, count: int, printed: str) -> None:
    """Run the cell after the durable one: it prints the names the run set in the notebook."""
    _run(browser, "notebook:run-cell", DURABLE_CELL + 1, count)
    assert browser.evaluate(NOTEBOOK_ERRORS) == []
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


def test_approve_reject_and_send_buttons_complete_a_parked_run(signal_lab: dict[str, Any], page: Any) -> None:  # noqa: F811
    ARTIFACTS.mkdir(exist_ok=True)
    failure_shot = ARTIFACTS / "approval-failure.png"
    failure_shot.unlink(missing_ok=True)
    try:
        page.goto(f"{signal_lab['url']}/lab/tree/{NOTEBOOK_NAME}?reset", wait_until="domcontentloaded")
        page.wait_for_function(NOTEBOOK_READY, timeout=KERNEL_READY_MS)

        # Run the cells up to the %%durable one: it parks on the signal and the cell returns.
        _run(page, "notebook:run-all-above", DURABLE_CELL + 1, DURABLE_CELL + 1)
        assert page.evaluate(NOTEBOOK_ERRORS) == []
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
        _names_landed(page, len(CELLS), "outcome: recorded True False ok")

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
    page: Any,  # noqa: F811
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    failure_shot = ARTIFACTS / "detached-approval-failure.png"
    failure_shot.unlink(missing_ok=True)
    runners = detached_lab["runners"]
    try:
        page.goto(f"{detached_lab['url']}/lab/tree/{NOTEBOOK_NAME}?reset", wait_until="domcontentloaded")
        page.wait_for_function(NOTEBOOK_READY, timeout=KERNEL_READY_MS)
        _run(page, "notebook:run-all-above", DURABLE_CELL + 1, DURABLE_CELL + 1)  # handed over: returns at once
        assert page.evaluate(NOTEBOOK_ERRORS) == []
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

        _names_landed(page, len(DETACHED_CELLS), "outcome: recorded True False")

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
