"""The magics in terminal IPython (no kernel, no widgets): text progress and text tables."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    monkeypatch.setenv("DURABLE_MONTY_DB", f"sqlite:///{tmp_path / 'terminal.db'}")
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    ip.run_cell("def double(x):\n    return x * 2\nitems = [1, 2, 3]")
    yield ip
    ip.run_line_magic("unload_ext", "durable_monty_nb")
    ip.user_ns.pop("doubled", None)


def test_durable_cell_in_a_terminal(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%%durable term\ndoubled = await gather(*[double(i) for i in items])\nsum(doubled)")
    assert result.success and result.result == 12
    assert shell.user_ns["doubled"] == [2, 4, 6]
    out = capsys.readouterr().out
    assert "term: completed · 3/3 calls done" in out  # the text view's final line

    shell.run_cell("%durable_status")
    status = capsys.readouterr().out
    assert "term" in status and "completed" in status and "3/3" in status

    detail = shell.run_line_magic("durable_status", "term")
    assert "double" in repr(detail) and "done" in repr(detail)


def test_errors_render_without_internal_frames(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%%durable broken\nx = await doubel(1)")
    assert not result.success
    err = capsys.readouterr()
    text = err.out + err.err
    assert "UnknownNamesError: not defined in the namespace: 'doubel' (line 1)" in text
    assert "magics.py" not in text


def test_quiet_cell_prints_no_progress(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%%durable quiet --quiet\nprint('hello from the workflow')\nawait double(4)")
    assert result.result == 8
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "hello from the workflow"
    assert "calls done" not in out


def test_load_ext_lists_unfinished_executions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    from durable_monty_nb import Engine

    db = f"sqlite:///{tmp_path / 'left.db'}"
    release = threading.Event()

    def slow(i: int) -> int:
        release.wait(30)
        return i

    run = Engine(db).start("r = await slow(1)\nr + await slow(2)", {"slow": slow}, key="left-behind")
    run.cancel()
    release.set()
    run.wait(30)
    monkeypatch.setenv("DURABLE_MONTY_DB", db)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    try:
        out = capsys.readouterr().out
        assert "unfinished executions" in out and "left-behind (interrupted" in out
        assert "%durable_resume NAME (or --all)" in out
    finally:
        ip.run_line_magic("unload_ext", "durable_monty_nb")
