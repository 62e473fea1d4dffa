"""Live views of a run: an ipywidgets panel in Jupyter, progress lines in a terminal.

Views only read the run's progress, a few times a second at most, from one updater thread:
a 10,000-call run costs the browser no more than a 10-call one. In a widget only traits
change from that thread; ``display`` happens on the main thread, in the cell.
"""

from __future__ import annotations

import html
import sys
import threading
import time
from typing import Any, TextIO

from ..engine.handle import CallView, Run
from .status import call_columns, format_duration, html_table, select_calls

REFRESH_SECONDS = 0.25
CALL_ROWS = 50
STYLES = {"completed": "success", "failed": "danger", "interrupted": "warning", "running": ""}


def widgets_available() -> bool:
    """True inside a Jupyter kernel with ipywidgets installed."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return getattr(shell, "kernel", None) is not None


def summary(run: Run) -> str:
    """One line: what the run did, for terminals and status messages."""
    p = run.progress
    parts = [f"{p.done}/{p.total} calls done"] + [f"{count} {label}" for label, count in p.details() if count]
    if p.note:
        parts.append(p.note)
    state = "result from the store" if run.cached else run.status
    return f"{run.key}: {state} · " + " · ".join(parts)


class _Updater:
    """Calls ``refresh`` every REFRESH_SECONDS until the run is done, then once more."""

    def __init__(self, run: Run, refresh: Any) -> None:
        self._run = run
        self._refresh = refresh
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"durable-view-{run.key[:20]}")

    def start(self) -> None:
        self._refresh()
        self._thread.start()

    def _loop(self) -> None:
        while not self._run.wait(REFRESH_SECONDS):
            self._refresh()
        self._refresh()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


class TextView:
    """Progress lines for terminals: one when something changed, at most every few seconds."""

    def __init__(self, run: Run, stream: TextIO | None = None, interval: float = 2.0) -> None:
        self.run = run
        self._stream = stream
        self._interval = interval
        self._last = ""
        self._last_time = 0.0
        self._updater = _Updater(run, self.refresh)

    def start(self) -> None:
        self._updater.start()

    def refresh(self) -> None:
        line = summary(self.run)
        now = time.monotonic()
        final = self.run.done
        if line != self._last and (final or now - self._last_time >= self._interval):
            stream = self._stream or sys.stdout
            elapsed = _elapsed(self.run)
            stream.write(f"{line} ({format_duration(elapsed)})\n" if final and elapsed is not None else line + "\n")
            stream.flush()
            self._last, self._last_time = line, now

    def join(self, timeout: float | None = None) -> None:
        self._updater.join(timeout)


def _elapsed(run: Run) -> float | None:
    if run.started_at is None:
        return None
    return (run.finished_at or time.time()) - run.started_at


def make_widget(run: Run) -> Any:
    """The ipywidgets panel of a run (ipywidgets must be installed)."""
    import ipywidgets as widgets

    class RunWidget(widgets.VBox):
        """Name and status, a progress bar, counts, the calls, and the error of a failed run."""

        def __init__(self) -> None:
            self.run = run
            self._header = widgets.HTML()
            self._bar = widgets.IntProgress(min=0, max=1, value=0, layout=widgets.Layout(width="100%"))
            self._counts = widgets.HTML()
            self._calls_html = widgets.HTML()
            self._calls = widgets.Accordion(children=[self._calls_html], selected_index=None)
            self._calls.set_title(0, "Calls")
            self._error = widgets.HTML()
            self._calls.observe(lambda _: self.refresh(), names="selected_index")
            super().__init__([self._header, self._bar, self._counts, self._calls, self._error])
            self.add_class("durable-run")
            self._updater = _Updater(run, self.refresh)

        def __repr__(self) -> str:  # the text/plain fallback: stable, so nbval can compare it
            return f"DurableRun({run.key!r})"

        def start(self) -> None:
            self._updater.start()

        def join(self, timeout: float | None = None) -> None:
            self._updater.join(timeout)

        def refresh(self) -> None:
            p = run.progress
            status = "result from the store" if run.cached else run.status
            elapsed = _elapsed(run)
            timing = f" · {format_duration(elapsed)}" if elapsed is not None and not run.cached else ""
            self._header.value = (
                f"<b>{html.escape(run.key)}</b> · <span class='durable-status'>{html.escape(status)}</span>{timing}"
            )
            self._bar.max = max(p.total, 1)
            self._bar.value = min(p.done + p.failed, self._bar.max) if p.total else (1 if run.done else 0)
            self._bar.bar_style = STYLES.get(run.status, "")
            counts = [f"<b>{p.done}</b>/{p.total} done"]
            counts += [f"{n} {label}" for label, n in p.details() if n or label in ("running", "failed")]
            if p.note:
                counts.append(f"<span class='durable-note' style='color:#b45309'>⚠ {html.escape(p.note)}</span>")
            self._counts.value = " · ".join(counts)
            if self._calls.selected_index == 0:
                self._calls_html.value = calls_html(run.calls())
            error = run.error
            if run.status == "failed" and error is not None:
                self._error.value = f"<pre style='white-space:pre-wrap'>{html.escape(str(error))}</pre>"

    return RunWidget()


def calls_html(calls: list[CallView]) -> str:
    chosen, left_out = select_calls(calls, CALL_ROWS)
    rows = [
        [
            str(c.call_id),
            c.function,
            c.args,
            c.status,
            str(c.attempts),
            format_duration(c.duration),
            c.worker,
            c.error or "",
        ]
        for c in chosen
    ]
    more = f"<p>… and {left_out} more</p>" if left_out else ""
    headers, rows = call_columns(rows)
    return html_table(headers, rows, css_class="durable-calls") + more


def make_view(run: Run, *, quiet: bool = False) -> Any:
    """A widget in Jupyter, a text view elsewhere, nothing with ``quiet``."""
    if quiet:
        return None
    if widgets_available():
        return make_widget(run)
    return TextView(run)
