"""End to end in a real browser: JupyterLab runs the quickstart notebook in Chromium.

A headless JupyterLab server (the session's one, tests/shared_lab.py) serves a copy of
notebooks/quickstart.ipynb (outputs and saved widget state stripped, so everything checked comes
from this run) in a folder of this test alone, against that folder's empty SQLite store;
Playwright drives Debian's Chromium, runs all cells and checks the live durable widgets in the
DOM. Screenshots land in test-artifacts/ at the repository root.

Needs /usr/bin/chromium, the playwright package (never its downloaded browsers) and
jupyterlab. Without them the test is skipped, or fails when CI=true.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shared_lab import _log_tail

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the fixtures: skip, or fail in CI
    expect = None

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
ARTIFACTS = REPO / "test-artifacts"
KERNEL_READY_MS = 60_000
RUN_ALL_MS = 60_000
WIDGET_MS = 15_000
WIDGET_MARGIN_X, WIDGET_MARGIN_Y = 12, 3  # pixels around the widget in durable-widget.png


# JavaScript: the NotebookPanel of a notebook, through the app that
# --LabApp.expose_app_in_browser=True puts on window.
def find_panel(path: str) -> str:
    """JavaScript that sets ``panel`` to the NotebookPanel of the notebook at ``path``."""
    return f"""
const app = window.jupyterapp;
const panel = app && Array.from(app.shell.widgets('main'))
    .find(w => w.context && w.context.path === '{path}');
"""


def notebook_errors(path: str) -> str:
    """JavaScript returning the errors (``ename: evalue``) in the outputs of the notebook at ``path``."""
    return f"""() => {{
    {find_panel(path)}
    const errors = [];
    for (const cell of panel.content.widgets) {{
        if (cell.model.type !== 'code') continue;
        for (const output of cell.model.sharedModel.outputs) {{
            if (output.output_type === 'error') errors.push(output.ename + ': ' + output.evalue);
        }}
    }}
    return errors;
}}"""


def notebook_ready(path: str) -> str:
    """JavaScript: true once the notebook at ``path`` is loaded and its kernel connected and idle."""
    return f"""() => {{
    {find_panel(path)}
    const session = panel && panel.sessionContext.session;
    const kernel = session && session.kernel;
    return !!(panel && panel.context.isReady && panel.content.widgets.length > 0 && kernel
              && kernel.connectionStatus === 'connected' && kernel.status === 'idle');
}}"""


def start_run_all(path: str) -> str:
    """JavaScript: run all cells of the notebook at ``path``; ``window.__durableRunAll`` says how it ended."""
    return f"""() => {{
    {find_panel(path)}
    app.shell.activateById(panel.id);
    app.shell.collapseLeft();  // a wider notebook for the screenshots
    window.__durableRunAll = undefined;
    app.commands.execute('notebook:run-all-cells').then(
        ok => {{ window.__durableRunAll = ok === true ? 'ok' : 'run-all returned ' + ok; }},
        err => {{ window.__durableRunAll = 'run-all failed: ' + err; }});
}}"""


def run_all_finished(path: str) -> str:
    """JavaScript: true once run-all ended and every code cell of the notebook at ``path`` ran."""
    return f"""() => {{
    if (window.__durableRunAll === undefined) return false;
    {find_panel(path)}
    const cells = Array.from(panel.content.widgets).filter(c => c.model.type === 'code');
    return panel.sessionContext.session.kernel.status === 'idle'
        && cells.every(c => c.model.executionCount !== null);
}}"""


def _fresh_notebook(source: Path, target: Path) -> list[dict[str, Any]]:
    """Copy the notebook without outputs or saved widget state; return its cells."""
    nb = json.loads(source.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    nb["metadata"].pop("widgets", None)
    target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return nb["cells"]


@pytest.fixture
def lab(lab_folder: Any) -> Iterator[dict[str, Any]]:
    """The shared headless JupyterLab, and a fresh copy of the quickstart in a folder of this test."""
    cells = _fresh_notebook(NOTEBOOK, lab_folder.root / "quickstart.ipynb")
    yield {"folder": lab_folder, "cells": cells, "log": lab_folder.log, "path": lab_folder.path("quickstart.ipynb")}


def test_quickstart_widget_in_jupyterlab(lab: dict[str, Any], page: Any) -> None:
    cells = lab["cells"]
    durable_cells = [
        i for i, c in enumerate(cells) if c["cell_type"] == "code" and "".join(c["source"]).startswith("%%durable")
    ]
    assert durable_cells, "the quickstart has no %%durable cell"
    ARTIFACTS.mkdir(exist_ok=True)
    failure_shot = ARTIFACTS / "quickstart-failure.png"
    failure_shot.unlink(missing_ok=True)

    try:
        page.goto(lab["folder"].tree_url("quickstart.ipynb"), wait_until="domcontentloaded")
        page.wait_for_function(notebook_ready(lab["path"]), timeout=KERNEL_READY_MS)

        page.evaluate(start_run_all(lab["path"]))
        page.wait_for_function(run_all_finished(lab["path"]), timeout=RUN_ALL_MS)
        assert page.evaluate("() => window.__durableRunAll") == "ok"
        assert page.evaluate(notebook_errors(lab["path"])) == []

        # One live widget per %%durable cell, each finished with a full bar.
        widgets = page.locator(".jp-Notebook .durable-run")
        expect(widgets).to_have_count(len(durable_cells), timeout=WIDGET_MS)
        for i in range(len(durable_cells)):
            widget = widgets.nth(i)
            expect(widget.locator(".durable-status")).to_have_text(
                re.compile(r"^(completed|result from the store)$"), timeout=WIDGET_MS
            )
            bar = widget.locator(".widget-hprogress .progress-bar")
            expect(bar).to_have_attribute("style", re.compile(r"(^|;)\s*width:\s*100%"), timeout=WIDGET_MS)
            expect(widget).to_contain_text(re.compile(r"(^|\D)(\d+)/\2 done"), timeout=WIDGET_MS)

        # The first durable cell: a fresh run over an empty store, result 20.
        cell = page.locator(".jp-Notebook .jp-Cell").nth(durable_cells[0])
        expect(cell.locator(".jp-InputArea-editor")).to_contain_text("%%durable encode_all")
        widget = cell.locator(".durable-run")
        expect(widget).to_have_count(1)
        cell.scroll_into_view_if_needed()
        expect(widget).to_be_visible()
        expect(widget.locator(".durable-status")).to_have_text("completed", timeout=WIDGET_MS)
        bar = widget.locator(".widget-hprogress .progress-bar")
        expect(bar).to_have_attribute("style", re.compile(r"(^|;)\s*width:\s*100%"))
        expect(bar).to_have_class(re.compile(r"\bprogress-bar-success\b"))
        expect(widget).to_contain_text("21/21 done")  # 20 encode calls and make_playlist
        result = cell.locator(".jp-OutputArea-executeResult .jp-OutputArea-output")
        expect(result).to_have_text("20")

        page.screenshot(path=str(ARTIFACTS / "quickstart-widget.png"), full_page=True)
        box = widget.bounding_box()
        assert box is not None
        page.screenshot(
            path=str(ARTIFACTS / "durable-widget.png"),
            clip={
                "x": box["x"] - WIDGET_MARGIN_X,
                "y": box["y"] - WIDGET_MARGIN_Y,
                "width": box["width"] + 2 * WIDGET_MARGIN_X,
                "height": box["height"] + 2 * WIDGET_MARGIN_Y,
            },
        )
    except BaseException:
        print(f"JupyterLab log:\n{_log_tail(lab['log'])}")
        with contextlib.suppress(Exception):  # keep the original error
            page.screenshot(path=str(failure_shot), full_page=True)
        raise
