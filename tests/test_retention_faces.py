"""The faces of retention: %durable_forget and %durable_prune in a real IPython shell, and the
``durable-monty-nb forget / prune / status`` commands as real subprocesses beside a live run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from procs import wait_until

from durable_monty_nb import Engine

TESTS = Path(__file__).resolve().parent
SETUP = """
ran = []
def a(x):
    ran.append(("a", x))
    return x * 10
def b(x):
    ran.append(("b", x))
    return x + 1
items = [1, 2, 3]
"""
FIRST = "%%durable wf --quiet\nxs = await gather(*[a(i) for i in items])\nsum(xs)"
SECOND = FIRST.replace("sum(xs)", "ys = await gather(*[b(x) for x in xs])\nsum(ys)")
THIRD = SECOND + " * 2"
EDITED = THIRD.replace("for i in items", "for i in items + [4]")


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    monkeypatch.setenv("DURABLE_MONTY_DB", f"sqlite:///{tmp_path / 'retention.db'}")
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    ip.run_cell(SETUP)
    yield ip
    ip.run_line_magic("unload_ext", "durable_monty_nb")
    for name in ("ran", "a", "b", "items", "xs", "ys"):
        ip.user_ns.pop(name, None)


def run(ip: InteractiveShell, cell: str) -> Any:
    result = ip.run_cell(cell)
    assert result.success, result.error_in_exec or result.error_before_exec
    return result.result


def test_after_a_prune_the_cell_comes_from_the_store_and_an_edit_still_reuses(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(shell, FIRST) == 60
    assert run(shell, SECOND) == 63
    assert run(shell, THIRD) == 126  # three executions of the cell's workflow
    capsys.readouterr()

    run(shell, "%durable_prune --dry-run")
    assert "would remove 2 execution(s) of 1 workflow(s)" in capsys.readouterr().out
    run(shell, "%durable_prune")
    assert "removed 2 execution(s) of 1 workflow(s)" in capsys.readouterr().out
    run(shell, "%durable_status")
    status = capsys.readouterr().out
    assert "runs" in status and "size" in status

    shell.user_ns["ran"].clear()
    assert run(shell, THIRD) == 126
    assert shell.user_ns["ran"] == []  # the kept execution answered from the store
    assert run(shell, EDITED) == 2 * (11 + 21 + 31 + 41)
    assert sorted(shell.user_ns["ran"]) == [("a", 4), ("b", 40)]  # only the new item's calls ran

    capsys.readouterr()
    run(shell, "%durable_forget wf")
    assert "removed 2 execution(s) of 1 workflow(s)" in capsys.readouterr().out
    shell.user_ns["ran"].clear()
    assert run(shell, THIRD) == 126
    assert len(shell.user_ns["ran"]) == 6  # forgotten: everything ran again


def test_magics_refuse_bad_input(shell: InteractiveShell) -> None:
    result = shell.run_cell("%durable_forget nothing-here")
    assert not result.success and "no workflow or execution 'nothing-here'" in str(result.error_in_exec)
    result = shell.run_cell("%durable_prune --older-than soon")
    assert not result.success and "'7d'" in str(result.error_in_exec)
    magics = shell.magics_manager.registry["DurableMagics"]
    shell.run_cell("%config DurableMagics.retention = 'whenever'")  # refused (IPython logs the error)
    assert magics.retention is None
    run(shell, "%config DurableMagics.retention = '30d'")
    assert magics.engine().retention == 30 * 86400
    run(shell, "%config DurableMagics.retention = None")
    assert magics.engine().retention is None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "durable_monty_nb", *args], capture_output=True, text=True, timeout=120
    )


def test_commands_beside_a_live_run(sqlite_url: str, tmp_path: Path) -> None:
    engine = Engine(sqlite_url)
    try:
        for n in range(3):
            engine.run(f"await gather(*[a(i) for i in items])\n{n}", {"a": lambda x: x, "items": [1, 2]}, key="old")
    finally:
        engine.close()
    start, gate = tmp_path / "start", tmp_path / "gate"
    start.touch()  # the live run starts at once (this test runs no workflow `live` of its own)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "retention_runner.py"), sqlite_url, str(start), str(gate)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    engine = Engine(sqlite_url)
    try:

        def running() -> Any:
            row = engine.store.latest_execution("live")
            return row is not None and row.calls_done >= 2 and row.lease_owner

        wait_until(running, timeout=90, what="the live run", procs=(proc,))
        refused = cli("forget", "live", "--db", sqlite_url)
        assert refused.returncode == 1
        assert "ForgetRefused" in refused.stderr and f"process {proc.pid}" in refused.stderr

        status = cli("status", "--db", sqlite_url)
        assert status.returncode == 0 and "runs" in status.stdout and "size" in status.stdout

        dry = cli("prune", "--db", sqlite_url, "--dry-run")
        assert dry.returncode == 0 and "would remove 2 execution(s) of 1 workflow(s)" in dry.stdout
        assert len(engine.executions(all=True, key="old")) == 3
        pruned = cli("prune", "--db", sqlite_url, "--keep-latest", "1", "--older-than", "0s", "--vacuum")
        assert pruned.returncode == 0 and "removed 2 execution(s)" in pruned.stdout and "vacuumed" in pruned.stdout
        assert len(engine.executions(all=True, key="old")) == 1
        assert engine.store.latest_execution("live").status == "running"  # left alone

        bad = cli("prune", "--db", sqlite_url, "--older-than", "later")
        assert bad.returncode == 1 and "'7d'" in bad.stderr

        forced = cli("forget", "live", "--db", sqlite_url, "--force")
        assert forced.returncode == 0 and "removed 1 execution(s)" in forced.stdout
        assert engine.store.latest_execution("live") is None
        gate.touch()
        proc.communicate(timeout=60)
        assert proc.returncode != 0  # the forced-out run stopped: its execution is gone
        assert engine.store.latest_execution("live") is None  # and it wrote nothing back
        assert cli("forget", "old", "--db", sqlite_url).returncode == 0
        assert engine.executions(all=True) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        engine.close()
