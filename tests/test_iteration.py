"""What notebooks need: re-running, fixing and editing without paying for finished work twice."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from durable_monty_nb import Engine, WorkflowFailed


class Recorder:
    """Notebook-like functions that count how often each call really ran."""

    def __init__(self) -> None:
        self.ran: Counter[tuple[str, Any]] = Counter()

    def namespace(self, **extra: Any) -> dict[str, Any]:
        ran = self.ran

        def a(x: int) -> int:
            ran["a", x] += 1
            return x * 10

        def b(x: int) -> int:
            ran["b", x] += 1
            return x + 1

        return {"a": a, "b": b, **extra}


CODE = "xs = await gather(*[a(i) for i in items])\nys = await gather(*[b(x) for x in xs])\nys"


def test_completed_run_with_nothing_changed_returns_the_stored_result(engine: Engine) -> None:
    rec = Recorder()
    first = engine.start(CODE, rec.namespace(items=[1, 2]), key="same")
    assert first.result(timeout=30) == [11, 21]
    rec.ran.clear()
    again = engine.start(CODE, rec.namespace(items=[1, 2]), key="same")
    assert again.cached and again.done
    assert again.result() == [11, 21]
    assert again.outputs == {"xs": [10, 20], "ys": [11, 21]}
    assert not rec.ran
    assert len(engine.executions(all=True)) == 1


def test_changed_input_value_runs_again_reusing_equal_calls(engine: Engine) -> None:
    rec = Recorder()
    engine.run(CODE, rec.namespace(items=[1, 2]), key="inputs")
    rec.ran.clear()
    assert engine.run(CODE, rec.namespace(items=[1, 2, 3]), key="inputs") == [11, 21, 31]
    assert rec.ran == Counter({("a", 3): 1, ("b", 30): 1})  # only the new item's calls ran


def test_changed_function_definition_runs_its_calls_again(engine: Engine) -> None:
    rec = Recorder()
    engine.run(CODE, rec.namespace(items=[1, 2]), key="fn")
    rec.ran.clear()

    def b(x: int) -> int:  # a fixed version of b
        rec.ran["b2", x] += 1
        return x + 2

    assert engine.run(CODE, rec.namespace(items=[1, 2], b=b), key="fn") == [12, 22]
    assert rec.ran == Counter({("b2", 10): 1, ("b2", 20): 1})  # a's results came from the store


def test_edited_code_serves_unchanged_calls_and_keeps_them_in_order(engine: Engine) -> None:
    rec = Recorder()
    assert engine.run("await gather(a(1), a(2))", rec.namespace(), key="edit") == [10, 20]
    rec.ran.clear()
    # Inserting a call in front must not shift stored results onto the wrong calls.
    assert engine.run("await gather(a(5), a(1), a(2))", rec.namespace(), key="edit") == [50, 10, 20]
    assert rec.ran == Counter({("a", 5): 1})
    latest = engine.store.latest_execution("edit")
    assert latest.calls_reused == 2


def test_failed_run_resumes_after_a_fix_running_only_failed_and_remaining_calls(engine: Engine) -> None:
    rec = Recorder()
    ran = rec.ran

    def b(x: int) -> int:
        ran["b", x] += 1
        if x == 20:
            raise ValueError("bug for 20")
        return x + 1

    code = "xs = await gather(*[a(i) for i in items])\nys = await gather(*[b(x) for x in xs])\nz = await a(99)\nys"
    with pytest.raises(WorkflowFailed, match="bug for 20"):
        engine.run(code, rec.namespace(items=[1, 2, 3], b=b), key="fix")
    assert engine.store.latest_execution("fix").status == "failed"
    ran.clear()

    def b_fixed(x: int) -> int:
        ran["b", x] += 1
        return x + 1

    assert engine.run(code, rec.namespace(items=[1, 2, 3], b=b_fixed), key="fix") == [11, 21, 31]
    # a(1..3), b(10) and b(30) had completed; only the failed call and the rest ran.
    assert ran == Counter({("b", 20): 1, ("a", 99): 1})
    assert len(engine.executions(all=True)) == 1  # the same execution, resumed


def test_rerun_starts_fresh(engine: Engine) -> None:
    rec = Recorder()
    engine.run(CODE, rec.namespace(items=[1]), key="fresh")
    rec.ran.clear()
    engine.run(CODE, rec.namespace(items=[1]), key="fresh", rerun=True)
    assert rec.ran == Counter({("a", 1): 1, ("b", 10): 1})


def test_key_is_derived_from_the_code_when_not_given(sqlite_engine: Engine) -> None:
    rec = Recorder()
    first = sqlite_engine.start(CODE, rec.namespace(items=[1]))
    first.result(timeout=30)
    assert first.key.startswith("code-")
    assert sqlite_engine.start(CODE, rec.namespace(items=[1])).cached


def test_reuse_is_scoped_to_the_key(sqlite_engine: Engine) -> None:
    rec = Recorder()
    sqlite_engine.run(CODE, rec.namespace(items=[1]), key="one")
    rec.ran.clear()
    sqlite_engine.run(CODE, rec.namespace(items=[1]), key="two")
    assert rec.ran == Counter({("a", 1): 1, ("b", 10): 1})


def test_resume_by_name_needs_the_functions_and_loses_nothing(sqlite_engine: Engine) -> None:
    import threading

    from durable_monty_nb import UnknownNamesError

    release = threading.Event()
    ran: list[int] = []

    def a(x: int) -> int:
        ran.append(x)
        if x == 2:
            release.wait(30)
        return x

    run = sqlite_engine.start("r = await gather(a(1), a(2))\nr + [await a(3)]", {"a": a}, key="missing")
    run.cancel()  # a(3) is never dispatched: the execution stops unfinished
    release.set()
    run.wait(30)
    assert run.status == "interrupted"
    with pytest.raises(UnknownNamesError, match=r"'a' .*Nothing was lost"):
        sqlite_engine.resume("missing", {})
    assert sqlite_engine.store.latest_execution("missing").status == "interrupted"
    before = list(ran)
    assert sqlite_engine.resume("missing", {"a": a}).result(timeout=30) == [1, 2, 3]
    assert sorted(ran) == sorted(before + [x for x in (1, 2, 3) if x not in before])  # each call once
