"""Executors behind a registry: a third-party executor registers by name and %%durable runs on it."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from durable_monty_nb import Engine
from durable_monty_nb.executors import (
    ENTRY_POINT_GROUP,
    Threads,
    backend,
    executor_entry,
    executor_names,
    register_executor,
    unregister_executor,
)
from durable_monty_nb.executors.base import Done, Outcome, Task


class InlineExecutor:
    """Runs each task at once in the submitting thread: the smallest executor there is."""

    name = "inline"
    remote = False
    durable = False
    problem = None

    def __init__(self, log: list[str], tag: str) -> None:
        self.log = log
        self.tag = tag

    def submit(self, tasks: Sequence[Task], done: Done) -> None:
        for task in tasks:
            call = task.local
            assert call is not None
            self.log.append(f"{self.tag}:{task.function}")
            started = __import__("time").time()
            try:
                value = call.context.run(call.fn, *call.args, **call.kwargs)
            except Exception as exc:
                done(Outcome.of(task, started, error=exc))
            else:
                done(Outcome.of(task, started, value))

    def attach(self, tasks: Sequence[Task], done: Done) -> list[Task]:
        return list(tasks)

    def cancel(self, tasks: Sequence[Task]) -> None:
        return None

    def counts(self) -> tuple[int, int]:
        return 0, 0

    def shutdown(self) -> None:
        return None


LOG: list[str] = []


@dataclass(frozen=True)
class Inline:
    """The backend of the inline executor; ``tag`` is its one setting."""

    tag: str = "inline"
    name: str = "inline"
    remote = False
    opened: list[str] = field(default_factory=list, compare=False)

    def check(self) -> None:
        return None

    def open(self, run: Any) -> InlineExecutor:
        self.opened.append(run.execution_id)
        return InlineExecutor(LOG, self.tag)


@pytest.fixture
def inline() -> Iterator[None]:
    LOG.clear()
    register_executor("inline", Inline, settings=("tag",))
    yield
    unregister_executor("inline")


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    monkeypatch.setenv("DURABLE_MONTY_DB", f"sqlite:///{tmp_path / 'registry.db'}")
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    ip.run_cell(
        "import threading\ndef double(x):\n    return (x * 2, threading.current_thread().name)\nitems = [1, 2, 3]"
    )
    yield ip
    ip.run_line_magic("unload_ext", "durable_monty_nb")
    for name in ("pairs", "total"):
        ip.user_ns.pop(name, None)


CELL = "pairs = await gather(*[double(i) for i in items])\ntotal = sum(p[0] for p in pairs)\ntotal"


def test_the_package_registers_its_three_executors() -> None:
    assert executor_names()[:3] == ("threads", "rq", "dask")
    assert executor_entry("rq").settings == ("url", "queue")
    assert executor_entry("dask").settings == ("address",)
    assert backend("threads", workers=3) == Threads(3)
    with pytest.raises(ValueError, match="unknown executor 'nope': choose one of threads, rq, dask"):
        backend("nope")


def test_a_registered_executor_runs_a_cell_through_the_magic(shell: InteractiveShell, inline: None) -> None:
    result = shell.run_cell(f"%%durable doubled --executor inline --quiet\n{CELL}")
    assert result.error_in_exec is None and result.error_before_exec is None
    assert result.result == 12
    assert sorted(LOG) == ["inline:double"] * 3
    main = threading.current_thread().name
    driver_threads = {thread for _, thread in shell.user_ns["pairs"]}
    assert main not in driver_threads and len(driver_threads) == 1  # the driver's thread: inline, no pool


def test_config_chooses_a_registered_executor_with_its_settings(shell: InteractiveShell, inline: None) -> None:
    try:
        shell.run_line_magic("config", "DurableMagics.executor = 'inline'")
        shell.run_line_magic("config", "DurableMagics.executor_settings = {'inline': {'tag': 'tagged'}}")
        result = shell.run_cell(f"%%durable by-config --quiet\n{CELL}")
        assert result.error_in_exec is None and result.result == 12
        assert sorted(LOG) == ["tagged:double"] * 3
    finally:
        magics = shell.magics_manager.registry["DurableMagics"]
        magics.executor, magics.executor_settings = "threads", {}
        for option in ("executor", "executor_settings"):
            shell.config.DurableMagics.pop(option, None)


def test_an_unknown_executor_is_refused_by_name(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    result = shell.run_cell(f"%%durable unknown --executor rayy --quiet\n{CELL}")
    out = capsys.readouterr()
    assert result.error_in_exec is not None
    assert "unknown executor 'rayy': choose one of threads, rq, dask" in out.out + out.err
    assert "Nothing ran." in out.out + out.err
    assert "total" not in shell.user_ns
    try:
        shell.run_line_magic("config", "DurableMagics.executor = 'rayy'")
        assert "DurableMagics.executor: unknown executor 'rayy'" in caplog.text
        assert shell.magics_manager.registry["DurableMagics"].executor == "threads"
    finally:
        shell.config.DurableMagics.pop("executor", None)


def test_engine_takes_a_registered_name(tmp_path: Path, inline: None) -> None:
    engine = Engine(tmp_path / "engine.db", executor="inline")
    try:
        assert engine.run("await gather(*[f(i) for i in range(4)])", {"f": lambda x: x + 1}, key="e") == [1, 2, 3, 4]
        assert LOG == ["inline:f"] * 4
    finally:
        engine.close()


def test_an_entry_point_registers_an_executor_imported_only_when_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package's entry point: registered by name at the first look-up, its module imported on first use."""
    import sys
    from importlib import metadata

    from durable_monty_nb.executors import registry

    plugin = tmp_path / "dm_plugin_probe.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "@dataclass(frozen=True)\n"
        "class Probe:\n    size: int = 1\n    name: str = 'probe'\n    remote = False\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    point = metadata.EntryPoint("probe", "dm_plugin_probe:Probe", ENTRY_POINT_GROUP)
    real = metadata.entry_points

    def entry_points(**selection: Any) -> Any:
        found = list(real(**selection))
        return [*found, point] if selection.get("group") == ENTRY_POINT_GROUP else found

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    try:
        assert "probe" in executor_names()
        assert "dm_plugin_probe" not in sys.modules  # registered, not imported
        assert executor_entry("probe").settings == ("size", "name")  # its keyword parameters
        assert backend("probe", size=5, workers=3).size == 5  # settings it does not take are left out
    finally:
        unregister_executor("probe")
        sys.modules.pop("dm_plugin_probe", None)


def test_a_name_is_registered_once_unless_replaced() -> None:
    register_executor("twice", Inline)
    try:
        with pytest.raises(ValueError, match="executor 'twice' is already registered"):
            register_executor("twice", Threads)
        register_executor("twice", Threads, replace=True)
        assert backend("twice", workers=2) == Threads(2)
        with pytest.raises(ValueError, match="is a Python identifier"):
            register_executor("no spaces", Threads)
    finally:
        unregister_executor("twice")
