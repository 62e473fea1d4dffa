"""One headless JupyterLab server and one Chromium for all the browser tests of a session.

Starting JupyterLab costs about 6 s and stopping it about 3.5 s, per test. The browser tests
share one server (``shared_server``) and one Chromium (``shared_browser``); each test gets a
fresh folder of the server's root of its own (``LabServer.new_folder``), whose notebooks' kernels
run in that folder and so use its default store (``.durable/durable_monty.db`` there: the server
runs without ``DURABLE_MONTY_DB``), and a fresh browser context (``conftest.page``). After each
test its notebooks' sessions are shut down and their kernels killed if they survive; the server
and the browser close after the last browser test in a row (conftest's runtest teardown hook).

Needs /usr/bin/chromium, the playwright package (never its downloaded browsers) and
jupyterlab. Without them the tests are skipped, or fail when CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ci import missing
from procs import free_port

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # reported by _require_tools: skip, or fail in CI
    sync_playwright = None

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
VIEWPORT = {"width": 1280, "height": 900}
SERVER_START_SECONDS = 60
SERVER_STOP_SECONDS = 20
SESSION_STOP_SECONDS = 20
DB_ENV = "DURABLE_MONTY_DB"


def _require_tools() -> None:
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    if sync_playwright is None:
        missing("the playwright package is missing (pip install playwright; no browser download needed)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        missing("jupyterlab is missing (pip install 'jupyterlab>=4.2')")


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


def _kill_processes(marker: str) -> None:
    """SIGKILL the processes whose command line contains ``marker`` (kernels that outlived their shutdown)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    needle = marker.encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@dataclass
class LabFolder:
    """A test's own folder of the shared server's root: its notebooks, their kernels' working directory."""

    url: str  # the server's base URL
    rel: str  # the folder's path relative to the server's root (how JupyterLab names it)
    root: Path  # the folder on disk
    log: Path  # the server's log (shared: a test's lines are the last ones when it fails)

    @property
    def db(self) -> Path:
        """The default store of the folder, which its kernels use (the server has no DURABLE_MONTY_DB)."""
        return self.root / ".durable" / "durable_monty.db"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db}"

    def path(self, name: str) -> str:
        """A notebook's path as JupyterLab names it (``context.path``)."""
        return f"{self.rel}/{name}"

    def tree_url(self, name: str) -> str:
        """The URL that opens the notebook alone (``?reset``: no workspace of an earlier test)."""
        return f"{self.url}/lab/tree/{self.path(name)}?reset"


class LabServer:
    """A headless JupyterLab on a free port, serving ``base / "root"``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = base / "runtime"
        self.log = base / "jupyter-lab.log"
        self.folders = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        _write_settings(self.base / "lab-settings")
        env = dict(os.environ)  # keeps DURABLE_MONTY_KEY (set by conftest)
        env.pop(DB_ENV, None)  # each kernel uses the default store of its test's folder
        env.update(
            JUPYTERLAB_SETTINGS_DIR=str(self.base / "lab-settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(self.base / "lab-workspaces"),
            JUPYTER_CONFIG_DIR=str(self.base / "jupyter-config"),
            JUPYTER_RUNTIME_DIR=str(self.runtime_dir),
            IPYTHONDIR=str(self.base / "ipython"),
        )
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
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.open_browser=False",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
        ]
        with self.log.open("wb") as log_file:
            self.server = subprocess.Popen(command, cwd=self.root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if self.server.poll() is not None:
                code = self.server.returncode
                self.server = None
                pytest.fail(f"JupyterLab exited with {code}:\n{_log_tail(self.log)}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{self.url}/api", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"JupyterLab did not answer in {SERVER_START_SECONDS} s:\n{_log_tail(self.log)}", pytrace=False
                )
            time.sleep(0.2)  # polling interval, not synchronization

    def stop(self) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        server.terminate()  # SIGTERM: the server shuts its kernels down, then exits
        try:
            server.wait(SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(SERVER_STOP_SECONDS)
        _kill_processes(str(self.runtime_dir))

    def new_folder(self, name: str) -> LabFolder:
        """A fresh, empty folder of the root for one test."""
        self.folders += 1
        rel = f"{self.folders:02d}-{re.sub(r'[^A-Za-z0-9_-]+', '-', name)[:60]}"
        (self.root / rel).mkdir()
        return LabFolder(url=self.url, rel=rel, root=self.root / rel, log=self.log)

    def _api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method)
        with urllib.request.urlopen(request, timeout=SESSION_STOP_SECONDS) as response:
            body = response.read()
        return json.loads(body) if body else None

    def close_folder(self, folder: LabFolder) -> None:
        """Shut down the sessions of the folder's notebooks; kill their kernels if they survive."""
        if self.server is None:
            return
        sessions = [s for s in self._api("GET", "sessions") if s["path"].startswith(folder.rel + "/")]
        for session in sessions:
            with contextlib.suppress(urllib.error.HTTPError):  # gone already
                self._api("DELETE", f"sessions/{session['id']}")
        for session in sessions:  # a kernel's command line names its connection file
            _kill_processes(f"kernel-{session['kernel']['id']}.json")


class Browser:
    """Chromium through Playwright (never a downloaded browser)."""

    def __init__(self) -> None:
        self.playwright = sync_playwright().start()
        try:
            self.chromium = self.playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except BaseException:
            self.playwright.stop()
            raise

    def new_context(self) -> Any:
        return self.chromium.new_context(viewport=VIEWPORT, device_scale_factor=2)

    def close(self) -> None:
        try:
            self.chromium.close()
        finally:
            self.playwright.stop()


_shared: dict[str, Any] = {}


def shared_server(tmp_path_factory: pytest.TempPathFactory) -> LabServer:
    """The session's JupyterLab server, started on first use (in a fresh temporary folder)."""
    _require_tools()
    server = _shared.get("server")
    if server is None:
        server = LabServer(tmp_path_factory.mktemp("jupyter-lab"))
        server.start()
        _shared["server"] = server
    return server


def shared_browser() -> Browser:
    """The session's Chromium, launched on first use."""
    _require_tools()
    browser = _shared.get("browser")
    if browser is None:
        browser = _shared["browser"] = Browser()
    return browser


def close_shared() -> None:
    """Close the shared browser and stop the shared server (the next browser test starts new ones)."""
    browser, server = _shared.pop("browser", None), _shared.pop("server", None)
    try:
        if browser is not None:
            browser.close()
    finally:
        if server is not None:
            server.stop()
