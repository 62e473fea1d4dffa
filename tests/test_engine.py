"""Running workflow code: every shape of code, concurrency, prints, progress, cancel."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from durable_monty_nb import Engine
from durable_monty_nb.engine import driver as driver_module
from durable_monty_nb.errors import ExecutionNotFound, WorkflowFailed


def double(x: int) -> int:
    return x * 2


def total(values: list[int]) -> int:
    return sum(values)


def test_gather_result_and_exports(engine: Engine) -> None:
    code = "results = await gather(*[double(x) for x in items])\nsummary = total(results)\nsummary + 1"
    run = engine.start(code, {"double": double, "total": total, "items": [1, 2, 3]}, key="basic")
    assert run.result(timeout=60) == 13
    assert run.status == "completed"
    assert run.outputs == {"results": [2, 4, 6], "summary": 12}
    assert run.progress.total == 4 and run.progress.done == 4


def test_every_shape_of_workflow_code(engine: Engine) -> None:
    code = """
async def pair(i):
    a = await double(i)
    parts = await gather(*[double(j) for j in range(i)])
    return a + total(parts)

nested = await gather(*[pair(i) for i in range(4)])
sequential = 0
for i in range(3):
    sequential = sequential + await double(i)
plain = double(21)
plain_plus_one = plain + 1
tasks = [double(x) for x in items]
from_names = await gather(*tasks)
later = []
for x in items:
    later.append(double(x))
appended = await gather(*later)
(nested, sequential, plain_plus_one, from_names, appended, threshold)
"""
    ns = {"double": double, "total": total, "items": [5, 6], "threshold": 0.5}
    result = engine.run(code, ns, key="shapes")
    expected_nested = [2 * i + sum(2 * j for j in range(i)) for i in range(4)]
    assert result == (expected_nested, 6, 43, [10, 12], [10, 12], 0.5)


def test_sync_call_gets_a_value_not_a_coroutine(engine: Engine) -> None:
    result = engine.run("y = double(4)\ntype(y).__name__", {"double": double}, key="sync")
    assert result == "int"


def test_async_functions_run_concurrently(engine: Engine) -> None:
    barrier: dict[str, asyncio.Barrier] = {}

    async def meet(i: int) -> int:
        # Passes only when all eight calls are waiting at once.
        barrier.setdefault("b", asyncio.Barrier(8))
        async with asyncio.timeout(30):
            await barrier["b"].wait()
        return i

    assert engine.run("await gather(*[meet(i) for i in range(8)])", {"meet": meet}, key="async") == list(range(8))


def test_threads_run_calls_concurrently(engine: Engine) -> None:
    barrier = threading.Barrier(6, timeout=30)

    def meet(i: int) -> int:
        barrier.wait()
        return i

    result = engine.run("await gather(*[meet(i) for i in range(6)])", {"meet": meet}, key="threads", workers=6)
    assert result == list(range(6))


def test_prints_arrive_live_and_in_order(sqlite_engine: Engine) -> None:
    seen: list[str] = []
    printed_before = threading.Event()

    def on_print(stream: str, text: str) -> None:
        seen.append(text)
        if "before" in text:
            printed_before.set()

    def wait_for_print() -> str:
        # The workflow's first print must reach us while this call still runs.
        assert printed_before.wait(30), "the print did not arrive while the workflow was running"
        return "ok"

    code = 'print("before")\nr = await wait_for_print()\nprint("after", r)'
    sqlite_engine.run(code, {"wait_for_print": wait_for_print}, key="prints", print_callback=on_print)
    assert "".join(seen) == "before\nafter ok\n"


def test_large_fanout_is_fed_back_in_batches(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    original = driver_module.Driver._ready

    def recording(self: Any, snap: Any) -> dict[int, Any]:
        ready = original(self, snap)
        batches.append(len(ready))
        return ready

    monkeypatch.setattr(driver_module.Driver, "_ready", recording)
    n = 3000  # far beyond Monty's default limit of 1000 suspensions
    result = sqlite_engine.run(  # a gather of tasks built apart: announced call by call
        "tasks = [double(i) for i in range(n)]\nsum(await gather(*tasks))", {"double": double, "n": n}, key="fanout"
    )
    assert result == n * (n - 1)
    assert sum(batches) == n
    assert len([b for b in batches if b]) < n / 10  # results go back in batches, not one by one


def test_a_gathered_comprehension_is_one_monty_call_and_one_call_row_each(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    announced: list[str] = []
    original = driver_module.Driver._announce

    def recording(self: Any, snap: Any) -> Any:
        announced.append(snap.function_name)
        return original(self, snap)

    monkeypatch.setattr(driver_module.Driver, "_announce", recording)
    n = 3000
    code = "r = await gather(*[double(i) for i in range(n) if i % 3])\n(len(r), r[:3])"
    run = sqlite_engine.start(code, {"double": double, "n": n}, key="batched")
    assert run.result(timeout=60) == (2000, [2, 4, 8])
    assert announced == ["__dm_gather__"]  # one round trip to Monty for the whole fan-out
    calls = run.calls()
    assert len(calls) == 2000 and {c.status for c in calls} == {"done"}
    assert [c.args for c in calls[:2]] == ["1", "2"]
    assert (run.progress.total, run.progress.done) == (2000, 2000)


def test_background_progress_cancel_and_resume(sqlite_engine: Engine) -> None:
    release = threading.Event()
    ran: list[int] = []

    def slow(i: int) -> int:
        ran.append(i)
        if 2 <= i < 5:
            release.wait(30)
        return i

    ns = {"slow": slow}
    code = "r = await gather(*[slow(i) for i in range(5)])\nr + [await slow(5)]"
    run = sqlite_engine.start(code, ns, key="bg")
    assert not run.done
    wait = run.wait(0)
    assert wait is False
    _wait_for(lambda: run.progress.done == 2 and run.progress.running == 3)
    assert {c.status for c in run.calls()} == {"done", "running"}
    run.cancel()
    release.set()  # the running calls finish: their results are kept
    assert run.wait(30)
    assert run.status == "interrupted"
    with pytest.raises(Exception, match="interrupted"):
        run.result()
    row = sqlite_engine.store.latest_execution("bg")
    # slow(5) was announced and checkpointed, but not dispatched after the cancel.
    assert row.status == "interrupted" and row.calls_done == 5 and row.calls_total == 6

    ran.clear()
    again = sqlite_engine.start(code, ns, key="bg")
    assert again.result(timeout=30) == [0, 1, 2, 3, 4, 5]
    assert ran == [5]  # nothing ran twice
    assert again.progress.restored == 5


def test_engine_cancel_by_name_and_by_id(sqlite_engine: Engine) -> None:
    """``engine.cancel(name_or_id)``: no new call starts, the running one finishes and is kept;
    False for an execution this process does not drive; resumable afterwards."""
    release = threading.Event()
    started: list[int] = []

    def step(i: int) -> int:
        started.append(i)
        release.wait(30)
        return i

    code = "a = await step(1)\nb = await step(2)\nc = await step(3)\na + b + c"
    run = sqlite_engine.start(code, {"step": step}, key="cancel-me")
    _wait_for(lambda: started == [1])  # the moment chosen: the first step runs, the second is not announced
    assert sqlite_engine.cancel("cancel-me") is True
    release.set()
    assert run.wait(30) and run.status == "interrupted"
    assert started == [1]  # the next call never started
    row = sqlite_engine.store.latest_execution("cancel-me")
    assert row.status == "interrupted" and row.calls_done == 1  # the running call's result was kept
    assert sqlite_engine.cancel("cancel-me") is False and sqlite_engine.cancel(row.id) is False  # nothing driven
    with pytest.raises(ExecutionNotFound):
        sqlite_engine.cancel("no-such-workflow")

    release.clear()
    again = sqlite_engine.resume("cancel-me", {"step": step})
    _wait_for(lambda: started == [1, 2])
    assert sqlite_engine.cancel(again.execution_id) is True  # by id
    release.set()
    assert again.wait(30) and again.status == "interrupted"
    assert sqlite_engine.resume(row.id[:12], {"step": step}).result(timeout=30) == 6  # an id prefix also names it
    assert started == [1, 2, 3]  # each call ran once


def test_in_process_rerun_attaches_to_the_running_execution(sqlite_engine: Engine) -> None:
    release = threading.Event()

    def slow(i: int) -> int:
        release.wait(30)
        return i

    first = sqlite_engine.start("await slow(1)", {"slow": slow}, key="attach")
    second = sqlite_engine.start("await slow(1)", {"slow": slow}, key="attach")
    assert second is first
    release.set()
    assert first.result(timeout=30) == 1


def test_namespace_values_are_read_and_functions_resolved_by_value(engine: Engine) -> None:
    code = "f = double\nconfig['scale'] * f(2)"
    assert engine.run(code, {"double": double, "config": {"scale": 10}}, key="values") == 40


def test_durable_sleep(engine: Engine) -> None:
    code = "import asyncio\nimport time\nawait asyncio.sleep(0.05)\ntime.sleep(0.01)\nawait double(1)"
    run = engine.start(code, {"double": double}, key="sleep")
    assert run.result(timeout=30) == 2
    functions = [c.function for c in run.calls()]
    assert functions == ["asyncio.sleep", "time.sleep", "double"]


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_fingerprints_are_the_same_in_another_process() -> None:
    """A default value whose repr holds a memory address must not change a function's fingerprint."""
    import subprocess
    import sys

    code = (
        "from durable_monty_nb.engine.fingerprint import function_fingerprint\n"
        "class Marker: pass\n"
        "def step(x, marker=Marker(), *, options=object()):\n    return x\n"
        "print(function_fingerprint(step))"
    )
    prints = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(prints) == 1 and len(prints.pop().strip()) == 64


def test_batched_gathers_number_their_calls_as_the_call_by_call_path_does(sqlite_engine: Engine) -> None:
    batched = "a = await double(1)\nb = await gather(*[double(i) for i in range(3)])\nc = await double(b[2])\n(a, b, c)"
    by_call = batched.replace(
        "b = await gather(*[double(i) for i in range(3)])", "t = [double(i) for i in range(3)]\nb = await gather(*t)"
    )
    views = []
    for key, code in (("batched-ids", batched), ("by-call-ids", by_call)):
        run = sqlite_engine.start(code, {"double": double}, key=key)
        assert run.result(timeout=30) == (2, [0, 2, 4], 8)
        views.append([(c.call_id, c.function, c.args) for c in run.calls()])
    assert (
        views[0]
        == views[1]
        == [(0, "double", "1"), (1, "double", "0"), (2, "double", "1"), (3, "double", "2"), (4, "double", "4")]
    )


def picky(x: int) -> int:
    if x == 2:
        raise ValueError(f"no {x}")
    return x


def test_a_failing_batched_gather_reports_the_users_lines(sqlite_engine: Engine) -> None:
    code = "a = 1\nr = await gather(*[\n    picky(i)\n    for i in range(4)])\nr"
    with pytest.raises(WorkflowFailed) as caught:
        sqlite_engine.run(code, {"picky": picky}, key="batched-traceback")
    text = caught.value.traceback
    assert "line 2" in text and "r = await gather(*[" in text and "picky(i)" in text
    assert "__dm_gather__" not in text
    assert "The exception came from call 2, picky(2)" in text
