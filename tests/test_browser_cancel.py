"""In a real browser: **Cancel** on the widget of a background gather in JupyterLab stops it. The
queued calls never start, the two running ones finish and are kept, the run ends interrupted.

The same setup as tests/test_browser_signals.py (the session's JupyterLab and Chromium,
Playwright), with a notebook written here, in a folder of this test alone, whose calls log their
start and wait for a gate file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from procs import wait_until
from shared_lab import _log_tail
from test_browser import ARTIFACTS, KERNEL_READY_MS, WIDGET_MS, expect, notebook_ready
from test_browser_signals import ran_js, run_js

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

NOTEBOOK_NAME = "approval.ipynb"
DURABLE_CELL = 2


def _write_notebook(path: Path, log: Path, gate: Path) -> None:
    cells = [
        "%load_ext durable_monty_nb",
        "import os, time\n\n\ndef gated(i):\n"
        f"    with open({str(log)!r}, 'a') as handle:\n"
        "        handle.write(f'{i}\\n')\n"
        f"    while not os.path.exists({str(gate)!r}):\n"
        "        time.sleep(0.01)\n"
        "    return i",
        "%%durable fan --background --workers 2\nresults = await gather(*[gated(i) for i in range(60)])\nsum(results)",
    ]
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
def cancel_lab(lab_folder: Any, tmp_path: Path) -> dict[str, Any]:
    log, gate = tmp_path / "started.log", tmp_path / "gate"
    _write_notebook(lab_folder.root / NOTEBOOK_NAME, log, gate)
    return {
        "url": lab_folder.tree_url(NOTEBOOK_NAME),
        "path": lab_folder.path(NOTEBOOK_NAME),
        "log": lab_folder.log,
        "db": lab_folder.db_url,
        "started": log,
        "gate": gate,
    }


def started(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def test_cancel_button_stops_a_background_gather(cancel_lab: dict[str, Any], page: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        path = cancel_lab["path"]
        page.goto(cancel_lab["url"], wait_until="domcontentloaded")
        page.wait_for_function(notebook_ready(path), timeout=KERNEL_READY_MS)
        page.evaluate(run_js(path), ["notebook:run-all-cells", 0])
        page.wait_for_function(ran_js(path), arg=3, timeout=60_000)
        widget = page.locator(".jp-Notebook .jp-Cell").nth(DURABLE_CELL).locator(".durable-run")
        expect(widget).to_contain_text("2 running", timeout=WIDGET_MS)
        wait_until(lambda: len(started(cancel_lab["started"])) == 2, what="2 calls running")

        widget.locator("button", has_text="Cancel").click()
        expect(widget.locator("button", has_text="Cancelling")).to_be_visible(timeout=WIDGET_MS)
        cancel_lab["gate"].touch()  # the running calls may finish now: they are kept
        expect(widget.locator(".durable-status")).to_have_text("interrupted", timeout=WIDGET_MS)
        page.screenshot(path=str(ARTIFACTS / "cancel-interrupted.png"), full_page=True)
        assert len(started(cancel_lab["started"])) == 2  # no queued call started

        store = sa.create_engine(cancel_lab["db"])
        with store.connect() as conn:
            row = conn.execute(sa.text("SELECT status, calls_done, calls_total FROM dm_executions")).one()
        store.dispose()
        assert tuple(row) == ("interrupted", 2, 60)
    except BaseException:
        print(f"JupyterLab log:\n{_log_tail(cancel_lab['log'])}")
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / "cancel-failure.png"), full_page=True)
        raise
