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


def _failing_b(rec: Recorder) -> Any:
    ran = rec.ran

    def b(x: int) -> int:
        ran["b", x] += 1
        if x == 20:
            raise ValueError("bug for 20")
        return x + 1

    def b_fixed(x: int) -> int:
        ran["b", x] += 1
        return x + 1

    return b, b_fixed


FIX_CODE = "xs = await gather(*[a(i) for i in items])\nys = await gather(*[b(x) for x in xs])\nz = await a(99)\nys"


def test_a_failed_run_whose_function_was_fixed_runs_that_functions_calls_again(engine: Engine) -> None:
    # Running the code again is exact: b changed, so none of its old results is returned; a's are.
    rec = Recorder()
    b, b_fixed = _failing_b(rec)
    with pytest.raises(WorkflowFailed, match="bug for 20"):
        engine.run(FIX_CODE, rec.namespace(items=[1, 2, 3], b=b), key="fix")
    failed = engine.store.latest_execution("fix")
    assert failed.status == "failed"
    rec.ran.clear()
    again = engine.start(FIX_CODE, rec.namespace(items=[1, 2, 3], b=b_fixed), key="fix")
    assert again.result(timeout=30) == [11, 21, 31]
    assert rec.ran == Counter({("b", 10): 1, ("b", 20): 1, ("b", 30): 1, ("a", 99): 1})
    assert again.execution_id != failed.id  # a new execution: the snapshot holds the old b's results
    why = again.explain()
    assert {c.function for c in why.reused} == {"a"} and {c.source for c in why.reused} == {failed.id}
    assert "b changed: its code changed" in why.call("b").reason
    assert any("was failed; it was not resumed because function b changed" in d for d in why.decisions)


def test_resuming_a_failed_run_after_a_fix_runs_only_failed_and_remaining_calls(engine: Engine) -> None:
    # Resuming says the completed calls stay valid: only the failed call and the rest run.
    rec = Recorder()
    b, b_fixed = _failing_b(rec)
    with pytest.raises(WorkflowFailed, match="bug for 20"):
        engine.run(FIX_CODE, rec.namespace(items=[1, 2, 3], b=b), key="fix")
    rec.ran.clear()
    assert engine.resume("fix", rec.namespace(items=[1, 2, 3], b=b_fixed)).result(timeout=30) == [11, 21, 31]
    assert rec.ran == Counter({("b", 20): 1, ("a", 99): 1})
    assert len(engine.executions(all=True)) == 1  # the same execution, resumed


def test_a_failed_run_whose_input_value_changed_starts_over_reusing_valid_calls(engine: Engine) -> None:
    # The snapshot holds the old value: resuming it could never get past the failure.
    rec = Recorder()
    ran = rec.ran

    def b(x: int) -> int:
        ran["b", x] += 1
        if x == 20:
            raise ValueError("bug for 20")
        return x + 1

    with pytest.raises(WorkflowFailed, match="bug for 20"):
        engine.run(FIX_CODE, rec.namespace(items=[1, 2, 3], b=b), key="value")
    ran.clear()
    assert engine.run(FIX_CODE, rec.namespace(items=[1, 5, 3], b=b), key="value") == [11, 51, 31]
    assert ran == Counter({("a", 5): 1, ("b", 50): 1, ("a", 99): 1})
    assert len(engine.executions(all=True)) == 2
    # The explicit resume of such an execution does the same (it cannot take the new value either).
    ran.clear()
    with pytest.raises(WorkflowFailed, match="bug for 20"):
        engine.run(FIX_CODE, rec.namespace(items=[2], b=b), key="value2")
    assert engine.resume("value2", rec.namespace(items=[3], b=b)).result(timeout=30) == [31]
    assert len(engine.executions(all=True, key="value2")) == 2


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
