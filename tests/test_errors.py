"""Bad input gets a clear error that says what and where, and loses nothing."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from durable_monty_nb import (
    Engine,
    UnknownNamesError,
    ValueCrossingError,
    WorkflowCodeError,
    WorkflowFailed,
)


def double(x: int) -> int:
    return x * 2


class EncodeError(ValueError):
    pass


def broken(path: str) -> str:
    raise EncodeError(f"cannot encode {path}")


def test_syntax_error_names_the_line_and_stores_nothing(sqlite_engine: Engine) -> None:
    with pytest.raises(WorkflowCodeError) as info:
        sqlite_engine.run("x = 1\ny = (\n", {}, key="syntax")
    assert info.value.line == 2
    assert "line 2" in str(info.value)
    assert sqlite_engine.executions(all=True) == []


def test_unsupported_feature_names_the_line(sqlite_engine: Engine) -> None:
    with pytest.raises(WorkflowCodeError) as info:
        sqlite_engine.run("x = 1\nclass Mine(Exception):\n    pass\n", {}, key="unsupported")
    assert info.value.line == 2
    assert "class inheritance" in str(info.value)
    assert sqlite_engine.executions(all=True) == []


def test_unknown_names_are_listed_before_anything_runs(sqlite_engine: Engine) -> None:
    ran: list[int] = []

    def record(i: int) -> int:
        ran.append(i)
        return i

    with pytest.raises(UnknownNamesError) as info:
        sqlite_engine.run("a = await record(1)\nb = await encdoe(a)\nc = filez", {"record": record}, key="names")
    assert info.value.names == {"encdoe": 2, "filez": 3}
    assert "'encdoe' (line 2)" in str(info.value)
    assert ran == []


def test_builtins_the_sandbox_lacks_get_a_substitute(sqlite_engine: Engine) -> None:
    with pytest.raises(UnknownNamesError, match="Catch OSError"):
        sqlite_engine.run("try:\n    await double(1)\nexcept ConnectionError:\n    pass", {"double": double})


def test_module_value_says_what_to_do(sqlite_engine: Engine) -> None:
    with pytest.raises(ValueCrossingError, match=r"'os' .* is a module.*notebook function"):
        sqlite_engine.run("await double(os)", {"double": double, "os": os})


def test_unpicklable_value_says_which_and_what_to_do(sqlite_engine: Engine) -> None:
    with pytest.raises(ValueCrossingError, match=r"'lock' .*lock.*cannot be stored"):
        sqlite_engine.run("await double(lock)", {"double": double, "lock": threading.Lock()})


def test_unpicklable_result_fails_the_call_clearly(sqlite_engine: Engine) -> None:
    def make_lock() -> object:
        return threading.Lock()

    with pytest.raises(WorkflowFailed) as info:
        sqlite_engine.run("x = await make_lock()", {"make_lock": make_lock}, key="lock-result")
    assert "the result of make_lock() is a _thread.lock" in info.value.traceback


def test_unhandled_call_error_shows_workflow_line_and_function_traceback(engine: Engine) -> None:
    code = "ok = await double(1)\nvideo = await broken('a.mp4')\n"
    with pytest.raises(WorkflowFailed) as info:
        engine.run(code, {"double": double, "broken": broken}, key="unhandled")
    text = info.value.traceback
    assert 'File "<workflow unhandled>", line 2' in text
    assert "video = await broken('a.mp4')" in text
    assert "broken('a.mp4')" in text and "after 1 attempt" in text
    assert 'raise EncodeError(f"cannot encode {path}")' in text  # the function's own line
    assert "EncodeError: cannot encode a.mp4" in text
    row = engine.store.latest_execution("unhandled")
    assert row.status == "failed" and row.error_type == "ValueError"


def test_workflow_can_catch_call_errors_by_base_class(engine: Engine) -> None:
    code = """
try:
    await broken('b.mp4')
    outcome = 'no error'
except ValueError as e:
    outcome = 'caught: ' + str(e)
outcome
"""
    assert engine.run(code, {"broken": broken}, key="caught") == "caught: EncodeError: cannot encode b.mp4"


def test_runtime_error_in_workflow_code_names_the_line(sqlite_engine: Engine) -> None:
    with pytest.raises(WorkflowFailed) as info:
        sqlite_engine.run("a = await double(1)\nb = a / 0\n", {"double": double}, key="zero")
    assert "line 2" in info.value.traceback and "ZeroDivisionError" in info.value.traceback


def test_module_import_in_workflow_gets_a_hint(sqlite_engine: Engine) -> None:
    with pytest.raises(WorkflowFailed, match="Import other modules inside a notebook function"):
        sqlite_engine.run("import numpy\nnumpy.zeros(2)", {})


def test_dead_monty_worker_is_recovered_from_the_checkpoint(sqlite_engine: Engine) -> None:
    release, started = threading.Event(), threading.Event()
    ran: list[int] = []

    def slow(i: int) -> int:
        ran.append(i)
        if i == 1:
            started.set()
            release.wait(30)
        return i

    run = sqlite_engine.start(
        "a = await slow(0)\nb = await slow(1)\nc = await slow(2)\n[a, b, c]", {"slow": slow}, key="worker-crash"
    )
    assert started.wait(30)
    driver = sqlite_engine._active[run.execution_id]
    pid = driver.session.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the sandbox process dies while call 1 runs
    release.set()
    assert run.result(timeout=60) == [0, 1, 2]
    assert ran == [0, 1, 2]  # restored from the checkpoint, nothing ran twice
    assert driver._crashes == 1


def test_a_result_that_contains_itself_is_refused_naming_the_call(sqlite_engine: Engine) -> None:
    def loop() -> list[object]:
        x: list[object] = []
        x.append(x)
        return x

    with pytest.raises(WorkflowFailed) as info:
        sqlite_engine.run("a = await double(1)\nb = await loop()", {"double": double, "loop": loop}, key="cycle")
    text = info.value.traceback
    assert "ValueCrossingError: the result of loop() is a list that contains itself" in text
    assert "came from call 1, loop()" in text
    assert "internal error" not in text and "values.py" not in text and "RecursionError" not in text
    assert sqlite_engine.store.latest_execution("cycle").calls_done == 1  # the kernel and the run stay sound


def test_a_value_nested_too_deeply_is_refused_clearly(sqlite_engine: Engine) -> None:
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueCrossingError, match=r"'deep' .* nested too deeply"):
        sqlite_engine.run("await double(deep)", {"double": double, "deep": deep})


@pytest.mark.parametrize(
    ("code", "feature", "line"),
    [
        ("x = 1\nasync with foo():\n    pass", "'async with'", 2),
        ("async for item in feed():\n    pass", "'async for'", 1),
        ("del undefined_name", "'del'", 1),
        ("class A(Base):\n    pass", "class inheritance", 1),
        ("def g():\n    yield nothing", "'yield'", 2),
    ],
)
def test_unsupported_syntax_is_reported_before_unknown_names(
    sqlite_engine: Engine, code: str, feature: str, line: int
) -> None:
    with pytest.raises(WorkflowCodeError) as info:  # not UnknownNamesError for foo, feed, Base...
        sqlite_engine.run(code, {}, key="unsupported-first")
    assert not isinstance(info.value, UnknownNamesError)
    assert feature in str(info.value) and info.value.line == line
    assert sqlite_engine.executions(all=True) == []
