"""The live views: what the widget shows, and how often it talks to the browser."""

from __future__ import annotations

import threading
import time

import pytest

from durable_monty_nb import Engine
from durable_monty_nb.engine.handle import CallView
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
    assert repr(widget) == "DurableRun('shown')"  # the stable text/plain fallback
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
    widget._calls.selected_index = 0
    assert widget._calls_html.value.count("<tr>") == 4  # calls of a stored run come from the store


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
    while len(refreshes) < 4:  # let it tick a few times while 2,000 calls are in flight
        time.sleep(0.05)
    release.set()
    run.wait(60)
    widget.join(5)
    elapsed = time.monotonic() - started
    # One refresh at start, one at the end, and at most one per REFRESH_SECONDS in between,
    # however many calls finished meanwhile.
    assert len(refreshes) <= elapsed / views.REFRESH_SECONDS + 3
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
