"""End to end in a real browser: JupyterLab runs the quickstart notebook in Chromium.

A headless JupyterLab server serves a copy of notebooks/quickstart.ipynb (outputs and saved
widget state stripped, so everything checked comes from this run) against an empty SQLite
store; Playwright drives Debian's Chromium, runs all cells and checks the live durable
widgets in the DOM. Screenshots land in test-artifacts/ at the repository root.

Needs /usr/bin/chromium, the playwright package (never its downloaded browsers) and
jupyterlab. Without them the test is skipped, or fails when CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ci import missing

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the fixtures: skip, or fail in CI
    expect = sync_playwright = None

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

SERVER_START_SECONDS = 60
SERVER_STOP_SECONDS = 20
KERNEL_READY_MS = 60_000
RUN_ALL_MS = 60_000
WIDGET_MS = 15_000
WIDGET_MARGIN_X, WIDGET_MARGIN_Y = 12, 3  # pixels around the widget in durable-widget.png


# JavaScript: the NotebookPanel of the quickstart, through the app that
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


FIND_PANEL = find_panel("quickstart.ipynb")
NOTEBOOK_READY = notebook_ready("quickstart.ipynb")
START_RUN_ALL = f"""() => {{
    {FIND_PANEL}
    app.shell.activateById(panel.id);
    app.shell.collapseLeft();  // a wider notebook for the screenshots
    window.__durableRunAll = undefined;
    app.commands.execute('notebook:run-all-cells').then(
        ok => {{ window.__durableRunAll = ok === true ? 'ok' : 'run-all returned ' + ok; }},
        err => {{ window.__durableRunAll = 'run-all failed: ' + err; }});
}}"""
RUN_ALL_FINISHED = f"""() => {{
    if (window.__durableRunAll === undefined) return false;
    {FIND_PANEL}
    const cells = Array.from(panel.content.widgets).filter(c => c.model.type === 'code');
    return panel.sessionContext.session.kernel.status === 'idle'
        && cells.every(c => c.model.executionCount !== null);
}}"""
NOTEBOOK_ERRORS = notebook_errors("quickstart.ipynb")


def _require_tools() -> None:
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    if sync_playwright is None:
        missing("the playwright package is missing (pip install playwright; no browser download needed)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        missing("jupyterlab is missing (pip install 'jupyterlab>=4.2')")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _write_settings(settings_dir: Path) -> None:
    """JupyterLab user settings: no news or update checks (no internet), every cell rendered."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for name, settings in files.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings), encoding="utf-8")


def _log_tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _kill_leftover_kernels(runtime_dir: Path) -> None:
    """Kill kernels of this server that survived its shutdown (their command line names our runtime dir)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    marker = str(runtime_dir).encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@contextlib.contextmanager
def serve_lab(tmp_path: Path, root: Path, db: Path) -> Iterator[tuple[str, Path]]:
    """A headless JupyterLab on a free port serving ``root`` over the store ``db``: (URL, log)."""
    _require_tools()
    _write_settings(tmp_path / "lab-settings")
    runtime_dir = tmp_path / "runtime"
    env = dict(os.environ)  # keeps DURABLE_MONTY_KEY (set by conftest)
    env.update(
        DURABLE_MONTY_DB=f"sqlite:///{db}",
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
        JUPYTER_RUNTIME_DIR=str(runtime_dir),
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        "--IdentityProvider.token=",
        "--LabApp.expose_app_in_browser=True",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    log = tmp_path / "jupyter-lab.log"
    base_url = f"http://127.0.0.1:{port}"
    with log.open("wb") as log_file:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{_log_tail(log)}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{base_url}/api", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer in {SERVER_START_SECONDS} s:\n{_log_tail(log)}", pytrace=False)
            time.sleep(0.2)  # polling interval, not synchronization
        yield base_url, log
    finally:
        server.terminate()  # SIGTERM: the server shuts its kernels down, then exits
        try:
            server.wait(SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(SERVER_STOP_SECONDS)
        _kill_leftover_kernels(runtime_dir)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A headless JupyterLab on a free port, serving a fresh copy of the quickstart."""
    _require_tools()
    root = tmp_path / "root"
    root.mkdir()
    cells = _fresh_notebook(NOTEBOOK, root / "quickstart.ipynb")
    with serve_lab(tmp_path, root, tmp_path / "browser.db") as (base_url, log):
        yield {"url": base_url, "cells": cells, "log": log}


@pytest.fixture
def page() -> Iterator[Any]:
    """A Chromium page, 1280x900; Playwright never downloads a browser here."""
    _require_tools()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=2)
            yield context.new_page()
            context.close()
        finally:
            browser.close()


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
        page.goto(f"{lab['url']}/lab/tree/quickstart.ipynb?reset", wait_until="domcontentloaded")
        page.wait_for_function(NOTEBOOK_READY, timeout=KERNEL_READY_MS)

        page.evaluate(START_RUN_ALL)
        page.wait_for_function(RUN_ALL_FINISHED, timeout=RUN_ALL_MS)
        assert page.evaluate("() => window.__durableRunAll") == "ok"
        assert page.evaluate(NOTEBOOK_ERRORS) == []

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
