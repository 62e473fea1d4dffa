"""The live views: what the widget shows, and how often it talks to the browser."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from procs import wait_until

from durable_monty_nb import Engine, RunOptions
from durable_monty_nb.engine.run import CallView
from durable_monty_nb.notebook import views
from durable_monty_nb.notebook.status import select_calls
from durable_monty_nb.notebook.views import TextView, calls_html, make_widget


def double(x: int) -> int:
    return x * 2


def test_widget_shows_a_finished_run(sqlite_engine: Engine) -> None:
    run = sqlite_engine.start("await gather(*[double(i) for i in range(5)])", {"double": double}, key="shown")
    run.wait(30)
    widget = make_widget(run)
    widget.start()
    widget.join(5)
    assert repr(widget) == "shown: completed · 5/5 calls done"  # the text/plain form: stable, no timings
    assert "completed" in widget._header.value and "shown" in widget._header.value
    assert (widget._bar.value, widget._bar.max, widget._bar.bar_style) == (5, 5, "success")
    assert "<b>5</b>/5 done" in widget._counts.value
    widget._calls.selected_index = 0  # opening the list renders it
    assert widget._calls_html.value.count("<tr>") == 6  # header + 5 calls
    assert "durable-run" in widget._dom_classes  # the CSS class the browser test looks for


def test_widget_shows_failures_and_restored_counts(sqlite_engine: Engine) -> None:
    def broken(x: int) -> int:
        raise ValueError(f"no {x}")

    run = sqlite_engine.start(
        "a = await double(1)\nb = await broken(2)", {"double": double, "broken": broken}, key="broken"
    )
    run.wait(30)
    widget = make_widget(run)
    widget.refresh()
    assert widget._bar.bar_style == "danger"
    assert "1 failed" in widget._counts.value
    assert "ValueError: no 2" in widget._error.value

    cached = sqlite_engine.start("await gather(*[double(i) for i in range(3)])", {"double": double}, key="again")
    cached.wait(30)
    stored = sqlite_engine.start("await gather(*[double(i) for i in range(3)])", {"double": double}, key="again")
    widget = make_widget(stored)
    widget.refresh()
    assert "result from the store" in widget._header.value
    assert "3 restored" in widget._counts.value
    assert repr(widget) == "again: completed · 3 restored from the store"  # what headless outputs keep
    widget._calls.selected_index = 0
    assert widget._calls_html.value.count("<tr>") == 4  # calls of a stored run come from the store


def test_the_widget_says_why_calls_were_reused_or_ran_again(sqlite_engine: Engine) -> None:
    code = "await gather(*[f(i) for i in range(4)])"
    scale = {"by": 2}

    def f(x: int) -> int:
        return x * scale["by"]

    first = sqlite_engine.start(code, {"f": f, "scale": scale}, key="why")
    first.wait(30)
    widget = make_widget(first)
    widget.refresh()
    assert widget._why.layout.display == ""  # a finished run can say why
    assert widget._why_html.value == ""  # rendered only when opened

    scale["by"] = 3  # a global the function reads, changed in place: its calls run again
    edited = sqlite_engine.start(code, {"f": f, "scale": scale}, key="why")
    assert edited.result(timeout=30) == [0, 3, 6, 9]
    widget = make_widget(edited)
    widget.refresh()
    assert widget._why.get_title(0) == "Why: 0 reused, 4 ran here"
    widget._why.selected_index = 0  # opening it renders %durable_why's table
    assert widget._why_html.value.count("<tr>") == 5  # header + 4 calls
    assert "f changed: closure variable scale changed" in widget._why_html.value

    again = sqlite_engine.start(code + "\n1", {"f": f, "scale": scale}, key="why")  # the cell edited
    assert again.result(timeout=30) == 1
    widget = make_widget(again)
    widget.refresh()
    assert widget._why.get_title(0) == "Why: 4 reused, 0 ran here"
    widget._why.selected_index = 0
    assert widget._why_html.value.count("reused</td>") == 4


def test_the_widgets_why_table_is_cut_to_the_calls_that_ran(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views, "CALL_ROWS", 3)
    items = [1, 2, 3, 4, 5]
    sqlite_engine.start(
        "await gather(*[double(i) for i in items])", {"double": double, "items": items}, key="cut"
    ).wait(30)
    items.append(6)  # one new call, five reused
    run = sqlite_engine.start(
        "await gather(*[double(i) for i in items])", {"double": double, "items": items}, key="cut"
    )
    run.wait(30)
    widget = make_widget(run)
    widget._why.selected_index = 0
    widget.refresh()
    value = widget._why_html.value
    assert value.count("<tr>") == 4  # header + 3 rows, the call that ran first
    assert value.index("ran</td>") < value.index("reused</td>")
    assert "3 more; <code>%durable_why cut</code> lists every call." in value


def test_updates_are_throttled(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow(i: int) -> int:
        release.wait(30)
        return i

    run = sqlite_engine.start("await gather(*[slow(i) for i in range(2000)])", {"slow": slow}, key="throttle")
    widget = make_widget(run)
    refreshes: list[float] = []
    original = widget.refresh

    def counting() -> None:
        refreshes.append(time.monotonic())
        original()

    widget._updater._refresh = counting
    started = time.monotonic()
    widget.start()
    # Let it tick a few times while 2,000 calls are in flight (a deadline: a stuck widget fails, never hangs).
    wait_until(lambda: len(refreshes) >= 4, timeout=30, what="4 refreshes of the widget")
    release.set()
    assert run.wait(60)
    widget.join(5)
    elapsed = time.monotonic() - started
    # The README's promise, not the module's constant: at most four refreshes a second (one at
    # start and one at the end besides), however many calls finished meanwhile.
    assert len(refreshes) <= elapsed * 4 + 2
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(refreshes[:4]))  # no burst while calls are in flight
    assert widget._bar.value == 2000


def test_calls_needing_attention_come_first() -> None:
    calls = [CallView(i, "f", str(i), "done", 1, 0.1, None) for i in range(100)]
    calls[50] = CallView(50, "f", "50", "failed", 3, 0.1, "ValueError: x")
    calls[70] = CallView(70, "f", "70", "running", 1, None, None)
    chosen, left_out = select_calls(calls, limit=10)
    assert [c.call_id for c in chosen[:2]] == [50, 70]
    assert [c.call_id for c in chosen[2:]] == list(range(92, 100))  # then the latest finished ones
    assert left_out == 90
    assert "… and 50 more" in calls_html(calls)  # 50 rows at most in the widget


def test_text_view_prints_a_final_summary(sqlite_engine: Engine) -> None:
    import io

    run = sqlite_engine.start("await gather(*[double(i) for i in range(4)])", {"double": double}, key="text")
    stream = io.StringIO()
    view = TextView(run, stream=stream)
    view.start()
    run.wait(30)
    view.join(5)
    assert "text: completed · 4/4 calls done" in stream.getvalue().splitlines()[-1]


def test_without_ipywidgets_a_kernel_gets_the_text_view(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=object()))
    run = sqlite_engine.start("1", {}, key="optional")
    run.wait(30)
    assert views.widgets_available()
    assert type(views.make_view(run)).__name__ == "RunWidget"
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as if it were not installed
    assert not views.widgets_available()
    assert isinstance(views.make_view(run), TextView)
    assert views.make_view(run, quiet=True) is None


def test_pace_measures_recent_throughput_and_eta() -> None:
    from durable_monty_nb.engine.run import Progress
    from durable_monty_nb.notebook.live import Pace

    pace = Pace(window=10.0)
    pace.sample(Progress(total=100, done=5, restored=5), now=0.0)  # restored calls are not throughput
    assert pace.rate is None and pace.describe(Progress(total=100), running=True) == []
    pace.sample(Progress(total=100, done=25, restored=5), now=2.0)
    assert pace.rate == 10.0
    assert pace.eta(Progress(total=100, done=25, restored=5), expected=100) == 7.5
    assert pace.describe(Progress(total=100, done=25), running=True, expected=100) == ["10.0 calls/s", "ETA 7.5 s"]
    assert pace.describe(Progress(total=100, done=25), running=True) == ["10.0 calls/s"]  # no total known: no ETA
    assert pace.describe(Progress(total=100, done=25), running=False) == []  # a finished run has no pace
    for second in range(3, 30):  # only the last 10 s count: 1 call/s lately
        pace.sample(Progress(total=100, done=25 + second - 2, restored=5), now=float(second))
    assert pace.rate == pytest.approx(1.0)


def test_widget_breaks_calls_down_by_function(sqlite_engine: Engine) -> None:
    def broken(x: int) -> int:
        raise ValueError(f"no {x}")

    code = """
ok = await gather(*[double(i) for i in range(4)])
try:
    await broken(1)
except ValueError:
    pass
ok
"""
    run = sqlite_engine.start(code, {"double": double, "broken": broken}, key="by-function")
    assert run.result(30) == [0, 2, 4, 6]
    stats = {s.function: s for s in run.function_stats()}
    assert (stats["double"].total, stats["double"].done, stats["double"].failed) == (4, 4, 0)
    assert (stats["broken"].total, stats["broken"].done, stats["broken"].failed) == (1, 0, 1)
    assert stats["double"].mean is not None and stats["double"].longest >= stats["double"].mean
    widget = make_widget(run)
    widget.refresh()
    table = widget._functions.value
    assert "durable-functions" in table and table.index("broken") < table.index("double")  # failures first
    assert ">4/4</td>" in table


def test_refresh_does_not_format_every_call(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow(i: int) -> int:
        release.wait(30)
        return i

    run = sqlite_engine.start("await gather(*[slow(i) for i in range(300)])", {"slow": slow}, key="cheap")
    try:
        wait_until(lambda: run.progress.total == 300, what="the 300 calls to be announced")
        widget = make_widget(run)

        def no_calls() -> list[CallView]:
            raise AssertionError("the per-function breakdown must not build a view of every call")

        monkeypatch.setattr(run, "calls", no_calls)
        widget.refresh()  # the list of calls is closed: no call views, one pass for the breakdown
        assert "0/300" in widget._functions.value
    finally:
        release.set()
        run.wait(30)


def test_buttons_cancel_and_retry_failed(sqlite_engine: Engine) -> None:
    release, started = threading.Event(), threading.Event()

    def slow(i: int) -> int:
        started.set()
        release.wait(30)
        return i

    run = sqlite_engine.start("a = await slow(1)\nb = await slow(2)\na + b", {"slow": slow}, key="buttons")
    assert started.wait(30)
    widget = make_widget(run, cancellable=True)
    widget.refresh()
    assert widget._cancel.layout.display == "" and widget._retry.layout.display == "none"
    widget._cancel.click()
    release.set()
    run.wait(30)
    assert run.status == "interrupted"
    widget.refresh()
    assert widget._cancel.layout.display == "none"

    def broken(x: int) -> int:
        raise ValueError(f"no {x}")

    failed = sqlite_engine.start("await broken(3)", {"broken": broken}, key="retry")
    failed.wait(30)
    retried: list[object] = []
    widget = make_widget(failed, show_error=False, on_retry=retried.append)
    widget.refresh()
    assert widget._retry.layout.display == ""
    assert "ValueError: no 3" in widget._error.value and "(traceback below)" in widget._error.value
    assert "Traceback" not in widget._error.value  # the cell's error shows it: once is enough
    widget._retry.click()
    assert retried == [failed] and widget._retry.disabled
    assert make_widget(failed).show_error and "Traceback" in _refreshed(make_widget(failed))._error.value


def _refreshed(widget: object) -> object:
    widget.refresh()  # type: ignore[attr-defined]
    return widget


def test_text_view_shows_pace_and_the_breakdown(sqlite_engine: Engine) -> None:
    import io

    run = sqlite_engine.start("await gather(*[double(i) for i in range(4)])", {"double": double}, key="table")
    run.wait(30)
    stream = io.StringIO()
    view = TextView(run, stream=stream)
    view.start()
    view.join(5)
    lines = stream.getvalue().splitlines()
    assert lines[0].split() == ["function", "done", "running", "failed", "mean", "max"]
    assert lines[2].split()[:4] == ["double", "4/4", "0", "0"]
    assert lines[-1].startswith("table: completed · 4/4 calls done")


def test_calls_frame(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    def broken(name: str, level: int = 1) -> int:
        raise ValueError(f"no {name}")

    code = (
        "ok = await gather(*[double(i) for i in range(3)])\n"
        "try:\n    await broken('x.mp4', level=2)\nexcept ValueError:\n    pass"
    )
    run = sqlite_engine.start(code, {"double": double, "broken": broken}, key="frame")
    run.wait(30)
    frame = run.calls_frame()
    assert frame.index.name == "call" and list(frame.index) == [0, 1, 2, 3]
    assert frame.function.tolist() == ["double", "double", "double", "broken"]
    assert frame.arguments.tolist() == ["0", "1", "2", "'x.mp4', level=2"]
    assert frame.status.tolist() == ["done", "done", "done", "failed"]
    assert frame.error.tolist()[3] == "ValueError: no x.mp4" and frame.error.isna().sum() == 3
    assert (frame.end >= frame.start).all() and (frame.duration >= 0).all()
    assert str(frame.start.dt.tz) == "UTC"

    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match="calls_frame\\(\\) needs pandas"):
        run.calls_frame()


def test_a_loop_shows_calls_done_and_the_rate_without_a_total_bar_or_eta(sqlite_engine: Engine) -> None:
    from durable_monty_nb.engine.run import Progress

    gate = threading.Event()

    def step(i: int) -> int:
        if i == 12:
            gate.wait(30)
        return i

    code = "total = 0\nfor i in range(40):\n    total = total + await step(i)\ntotal"
    run = sqlite_engine.start(code, {"step": step}, key="loop")
    try:
        wait_until(lambda: run.progress.done == 12 and run.progress.running == 1, what="12 steps done")
        p = run.progress
        assert p.total == 13 and p.expected is None  # 13 announced, the code does not say how many more
        widget = make_widget(run)
        widget._pace.sample(Progress(), now=time.monotonic() - 6)  # a pace to show: 12 calls in 6 s
        widget.refresh()
        assert "<b>12</b> done" in widget._counts.value and "/13" not in widget._counts.value
        assert "calls/s" in widget._counts.value and "ETA" not in widget._counts.value
        assert widget._bar.layout.display == "none"
        assert "loop: running · 12 calls done" in views.summary(run)
    finally:
        gate.set()
    assert run.result(30) == sum(range(40))
    assert views.summary(run).startswith("loop: completed · 40/40 calls done")


def test_straight_code_counts_the_calls_it_has_not_reached_yet(sqlite_engine: Engine) -> None:
    gate = threading.Event()

    def slow(i: int) -> int:
        gate.wait(30)
        return i

    code = "rs = await gather(*[slow(i) for i in range(5)])\nlast = await double(sum(rs))\nlast"
    run = sqlite_engine.start(code, {"slow": slow, "double": double}, key="straight")
    try:
        wait_until(lambda: run.progress.running == 5, what="the gather running")
        assert (run.progress.total, run.progress.expected) == (5, 6)  # the gather and the call after it
        assert "0/6 calls done" in views.summary(run)
    finally:
        gate.set()
    assert run.result(30) == 20


def test_a_parked_run_says_what_it_waits_for_with_no_eta_and_signal_in_the_table(sqlite_engine: Engine) -> None:
    code = 'plan = await double(1)\ndecision = await signal("approve")\ndecision'
    run = sqlite_engine.start(code, {"double": double}, key="parked")
    try:
        wait_until(lambda: run.parked, what="the run parked on its signal")
        assert "parked: waiting for 'approve' · 1/2 calls done" in views.summary(run)
        widget = make_widget(run)
        widget.refresh()
        assert "waiting for &#x27;approve&#x27;" in widget._header.value and "ETA" not in widget._counts.value
        table = widget._functions.value
        assert ">signal</td>" in table and ">double</td>" in table  # every function, signal included
    finally:
        run.signal("approve", True)
    assert run.result(30) is True


def _held_gather(engine: Engine, key: str) -> tuple[object, threading.Event]:
    """A gather of 40 calls on 2 threads whose calls past the tenth wait for the gate: 10 done, 2 running."""
    gate = threading.Event()

    def step(i: int) -> int:
        if i >= 10:
            gate.wait(30)
        return i

    run = engine.start(
        "await gather(*[step(i) for i in range(40)])", {"step": step}, key=key, options=RunOptions(workers=2)
    )
    wait_until(lambda: run.progress.done == 10 and run.progress.running == 2, what="10 calls done, 2 held")
    return run, gate


def test_a_running_gather_shows_its_rate_and_eta_in_the_widget(sqlite_engine: Engine) -> None:
    from durable_monty_nb.engine.run import Progress
    from durable_monty_nb.notebook.live import breakdown_rows

    run, gate = _held_gather(sqlite_engine, "eta")
    try:
        widget = make_widget(run)
        widget._pace.sample(Progress(), now=time.monotonic() - 6)  # the pace's first sample, 6 s ago: 10 calls in 6 s
        widget.refresh()
        counts = widget._counts.value
        assert "<b>10</b>/40 done" in counts and "2 running" in counts
        assert "1.7 calls/s" in counts and "ETA 18.0 s" in counts  # 30 calls left at 10/6 a second
        assert widget._bar.layout.display == "" and (widget._bar.value, widget._bar.max) == (10, 40)
        table = widget._functions.value
        rows, _ = breakdown_rows(run.function_stats())
        assert rows[0][:4] == ["step", "10/40", "2", "0"] and "<td style='text-align:left;padding" in table
    finally:
        gate.set()
    assert run.result(30) == list(range(40))
    widget.refresh()
    assert "ETA" not in widget._counts.value and "calls/s" not in widget._counts.value  # a finished run has no pace


def test_the_text_view_prints_progress_lines_with_rate_and_eta_then_the_table(sqlite_engine: Engine) -> None:
    import io

    from durable_monty_nb.engine.run import Progress

    run, gate = _held_gather(sqlite_engine, "text-eta")
    stream = io.StringIO()
    view = TextView(run, stream=stream)
    try:
        view._pace.sample(Progress(), now=time.monotonic() - 6)
        view.refresh()
        (line,) = stream.getvalue().splitlines()
        assert line.startswith("text-eta: running · 10/40 calls done · 2 running")
        assert line.endswith("· 1.7 calls/s · ETA 18.0 s")
    finally:
        gate.set()
    run.wait(30)
    view.refresh()
    lines = stream.getvalue().splitlines()
    assert lines[1].split() == ["function", "done", "running", "failed", "mean", "max"]  # the table at the end
    assert lines[3].split()[:4] == ["step", "40/40", "0", "0"]
    assert lines[-1].startswith("text-eta: completed · 40/40 calls done")


def test_the_per_function_table_counts_sleeps_and_external_calls(sqlite_engine: Engine) -> None:
    import queue

    from durable_monty_nb import external

    published: queue.Queue[object] = queue.Queue()

    @external(hook=published.put)
    def render(x: int) -> str:
        raise AssertionError("an external function never runs in the kernel")

    code = "import asyncio\nimport time\nawait asyncio.sleep(0.01)\ntime.sleep(0.01)\nr = await render(1)\nr"
    run = sqlite_engine.start(code, {"render": render}, key="kinds")
    try:
        published.get(timeout=30)  # the sleeps are over, the external call is out
        wait_until(lambda: run.parked, what="the run parked on the external call")
        widget = make_widget(run)
        widget.refresh()
        table = widget._functions.value
        for function in ("asyncio.sleep", "time.sleep", "render"):
            assert f">{function}</td>" in table, table
        assert "waiting for the completion of render()" in widget._header.value
    finally:
        run.cancel()
    assert run.wait(30)
