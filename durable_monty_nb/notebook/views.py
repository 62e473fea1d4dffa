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
from collections.abc import Callable
from typing import Any, TextIO

from ..engine.run import CallView, FunctionStats, Run
from ..errors import last_line
from .live import Pace, breakdown_html, breakdown_text
from .scope import display_name
from .signal_views import WaitAnnouncer, make_signal_panel
from .status import call_columns, format_duration, html_table, select_calls
from .tracebacks import relabel

REFRESH_SECONDS = 0.25
CALL_ROWS = 50
STYLES = {"completed": "success", "failed": "danger", "interrupted": "warning", "running": ""}
# A widget whose kernel restarted or died (JupyterLab marks its views jupyter-widgets-disconnected):
# no broken-link icons and no buttons that would do nothing; one line says it is detached.
DETACHED_CSS = """<style>
.durable-run.jupyter-widgets-disconnected::before,
.durable-run .jupyter-widgets-disconnected::before { content: none !important; display: none !important; }
.durable-run .durable-detached { display: none; }
.durable-run.jupyter-widgets-disconnected .durable-detached { display: block; color: #6b7280; }
.durable-run.jupyter-widgets-disconnected .widget-button,
.durable-run.jupyter-widgets-disconnected .widget-text { display: none !important; }
</style>"""


def detached_html(name: str) -> str:
    """The line a widget shows once its kernel is gone (hidden while the kernel is connected)."""
    text = (
        f"detached from its kernel (restarted or shut down): this is {name} as it was then. "
        f"Run the cell again, or %durable_status {name}, to see where it is now."
    )
    return f"{DETACHED_CSS}<div class='durable-detached'>{html.escape(text)}</div>"


def widgets_available() -> bool:
    """True inside a Jupyter kernel with ipywidgets installed (a terminal IPython does not import
    ipywidgets to find out: about 0.1 s)."""
    from IPython import get_ipython

    if getattr(get_ipython(), "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def expected_total(run: Run) -> int | None:
    """The total a view may show (None: the code makes an unknown number of calls)."""
    p = run.progress
    return p.total if run.done else p.expected


def run_state(run: Run) -> str:
    """``completed``, ``result from the store``, ``waiting for 'approve'`` (a parked run), ``running``..."""
    if run.cached:
        return "result from the store"
    if run.parked:
        waits = run.waits()
        if waits:
            names = [repr(w.name) if w.kind == "signal" else f"the completion of {w.name}()" for w in waits]
            return "waiting for " + ", ".join(dict.fromkeys(names))
    return run.status


def done_text(run: Run, bold: bool = False) -> str:
    """``12/40 calls done``, or ``12 calls done`` when the total is not known ahead."""
    p = run.progress
    done = f"<b>{p.done}</b>" if bold else str(p.done)
    expected = expected_total(run)
    return f"{done}/{expected} calls done" if expected is not None else f"{done} calls done"


def text_form(run: Run) -> str:
    """The widget's plain-text form (what nbconvert and papermill outputs keep): its status line,
    stable for nbval (no timings, no ids). Replaced by the final line when the run ends."""
    if not run.done:
        return f"{display_name(run.key)}: {run_state(run)}"
    if run.cached:
        return f"{display_name(run.key)}: completed · {run.progress.done} restored from the store"
    return summary(run)


def summary(run: Run) -> str:
    """One line: what the run did, for terminals and status messages."""
    p = run.progress
    parts = [done_text(run)] + [f"{count} {label}" for label, count in p.details() if count]
    if p.note:
        parts.append(p.note)
    return f"{display_name(run.key)}: {run_state(run)} · " + " · ".join(parts)


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

    def __init__(
        self, run: Run, stream: TextIO | None = None, interval: float = 2.0, *, show_error: bool = True
    ) -> None:
        self.run = run
        self.show_error = show_error  # False when the cell raises the error itself
        self._stream = stream
        self._interval = interval
        self._last = ""
        self._last_time = 0.0
        self._pace = Pace()
        self._waits = WaitAnnouncer()
        self._updater = _Updater(run, self.refresh)

    def start(self) -> None:
        self._updater.start()

    def refresh(self) -> None:
        line = summary(self.run)
        now = time.monotonic()
        final = self.run.done
        hints = self._waits.lines(self.run)  # how to deliver what the run waits for (signal_views)
        if hints:
            (self._stream or sys.stdout).write("\n".join(hints) + "\n")
        progress = self.run.progress
        self._pace.sample(progress)
        if line != self._last and (final or now - self._last_time >= self._interval):
            stream = self._stream or sys.stdout
            elapsed = _elapsed(self.run)
            if final:
                table = "" if self.run.cached else breakdown_text(self.run.function_stats())
                if table:
                    stream.write(table + "\n")
                stream.write(f"{line} ({format_duration(elapsed)})\n" if elapsed is not None else line + "\n")
                error = self.run.error
                if self.show_error and self.run.status == "failed" and error is not None:
                    stream.write(relabel(str(error), _shell()) + "\n")
            else:
                pace = self._pace.describe(progress, running=not self.run.parked, expected=expected_total(self.run))
                stream.write(" · ".join([line, *pace]) + "\n")
            stream.flush()
            self._last, self._last_time = line, now

    def join(self, timeout: float | None = None) -> None:
        self._updater.join(timeout)


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _elapsed(run: Run) -> float | None:
    if run.started_at is None:
        return None
    return (run.finished_at or time.time()) - run.started_at


def make_widget(
    run: Run,
    *,
    show_error: bool = True,
    cancellable: bool = True,
    on_retry: Callable[[Run], Any] | None = None,
) -> Any:
    """The ipywidgets panel of a run (ipywidgets must be installed).

    ``show_error``: show the traceback of a failed run (False when the cell raises it below the
    widget: one line then). ``cancellable``: a **Cancel** button while it runs (only useful when
    the kernel is free to handle the click: a run in the background). ``on_retry(run)``: what
    **Retry failed** does, shown when the run failed; its output goes below the widget.
    """
    import ipywidgets as widgets

    name = display_name(run.key)

    class RunWidget(widgets.VBox):
        """Name and status, a progress bar, counts, the calls, and the error of a failed run.

        It follows its execution: :meth:`rebind` points it at the run that continues it (Retry
        failed, the cell run again after a fix), so the widget a failed run left says what
        became of it.
        """

        def __init__(self) -> None:
            self.run = run
            self._cancellable = cancellable
            self._on_retry = on_retry
            self._note = widgets.HTML()
            self._header = widgets.HTML()
            self._bar = widgets.IntProgress(min=0, max=1, value=0, layout=widgets.Layout(width="100%"))
            self._counts = widgets.HTML()
            self._calls_html = widgets.HTML()
            self._calls = widgets.Accordion(children=[self._calls_html], selected_index=None)
            self._calls.set_title(0, "Calls")
            # Why each call was reused or ran again (%durable_why), once the run is done.
            self._why_html = widgets.HTML()
            self._why = widgets.Accordion(children=[self._why_html], selected_index=None, layout=hidden_layout())
            self._why.set_title(0, "Why reused or ran again")
            self._why_shown: Run | None = None  # the run whose explanation _why_html holds
            self._error = widgets.HTML()
            self._calls.observe(lambda _: self.refresh(), names="selected_index")
            self._why.observe(lambda _: self.refresh(), names="selected_index")
            self.show_error = show_error
            self._pace = Pace()
            self._stats: list[FunctionStats] | None = None  # of a finished run, computed once
            self._functions = widgets.HTML()
            hidden = widgets.Layout(display="none")
            self._cancel = widgets.Button(
                description="Cancel", icon="stop", tooltip=f"%durable_cancel {name}", layout=hidden
            )
            self._cancel.on_click(self._cancel_clicked)
            self._retry = widgets.Button(
                description="Retry failed",
                icon="redo",
                tooltip="run the failed calls again, as running the cell again does",
                layout=widgets.Layout(display="none"),
            )
            self._retry.on_click(self._retry_clicked)
            self._out = widgets.Output()
            self._detached = widgets.HTML(detached_html(name))
            super().__init__(
                [
                    self._detached,
                    self._header,
                    self._note,
                    self._bar,
                    self._counts,
                    self._functions,
                    widgets.HBox([self._cancel, self._retry]),
                    self._calls,
                    self._why,
                    self._error,
                    self._out,
                ]
            )
            self._signals = make_signal_panel(run)  # waiting for a signal: Approve / Reject / Send
            self.children = (*self.children[:5], self._signals, *self.children[5:])
            self.add_class("durable-run")
            self._updater = _Updater(run, self.refresh)

        def __repr__(self) -> str:  # the text/plain fallback: stable, so nbval can compare it
            return text_form(self.run)

        def rebind(self, again: Run, note: str) -> None:
            """Follow ``again``, the run that continues this one (in the background: its error
            shows here, it can be cancelled); ``note`` says so under the header."""
            if again is self.run:
                return
            self.run = again
            self.show_error, self._cancellable = True, True
            self._pace, self._stats = Pace(), None
            self._note.value = f"<span class='durable-note'>{html.escape(note)}</span>"
            self._error.value = ""
            self._retry.disabled = False
            self._cancel.disabled, self._cancel.description = False, "Cancel"
            panel = make_signal_panel(again)
            self.children = tuple(panel if child is self._signals else child for child in self.children)
            self._signals = panel
            self._updater = _Updater(again, self.refresh)
            self._updater.start()

        def _cancel_clicked(self, _: Any) -> None:
            self.run.cancel()
            self._cancel.disabled = True
            self._cancel.description = "Cancelling…"

        def capture_error(self, msg_id: str) -> None:
            """Take the outputs of the cell's execute request ``msg_id`` (the failed run's
            traceback, raised by the cell right after) into this widget, where Retry failed can
            clear it: the frontend routes them here (ipywidgets' Output), not to the cell."""
            self._out.msg_id = msg_id

        def _retry_clicked(self, _: Any) -> None:
            if self._on_retry is None:
                return
            self._retry.disabled = True
            try:
                again = self._on_retry(self.run)
            except Exception as exc:  # shown below the earlier traceback, never raised into the comm handler
                with self._out:
                    print(f"{type(exc).__name__}: {exc}")
                self._retry.disabled = False
                return
            self._out.clear_output()  # the failed attempt's traceback: the cell no longer ends in it
            if isinstance(again, Run):  # this widget follows the retry (no second widget)
                self.rebind(again, "retrying the failed calls; the failed attempt's traceback was cleared")

        def start(self) -> None:
            self._updater.start()

        def join(self, timeout: float | None = None) -> None:
            self._updater.join(timeout)

        def refresh(self) -> None:
            run = self.run
            p = run.progress
            self._signals.refresh()
            status = run_state(run)
            expected = expected_total(run)
            elapsed = _elapsed(run)
            timing = f" · {format_duration(elapsed)}" if elapsed is not None and not run.cached else ""
            self._header.value = (
                f"<b>{html.escape(name)}</b> · <span class='durable-status'>{html.escape(status)}</span>{timing}"
            )
            # No bar for a total the code does not tell (loops): it would fill up and lie.
            self._bar.layout.display = "none" if expected is None else ""
            self._bar.max = max(expected or 0, 1)
            self._bar.value = min(p.done + p.failed, self._bar.max) if expected else (1 if run.done else 0)
            self._bar.bar_style = STYLES.get(run.status, "")
            counts = [done_text(run, bold=True).removesuffix(" calls done") + " done"]
            counts += [f"{n} {label}" for label, n in p.details() if n or label in ("running", "failed")]
            self._pace.sample(p)
            counts += self._pace.describe(p, running=not run.done and not run.parked, expected=expected)
            if p.note:
                counts.append(f"<span class='durable-note' style='color:#b45309'>⚠ {html.escape(p.note)}</span>")
            self._counts.value = " · ".join(counts)
            self._functions.value = breakdown_html(self._function_stats())
            if self._calls.selected_index == 0:
                self._calls_html.value = calls_html(run.calls())
            explained = run.done and run.explainable
            self._why.layout.display = "" if explained else "none"
            if explained:
                reused = p.reused + p.restored
                self._why.set_title(0, f"Why: {reused} reused, {p.done - reused} ran here")
                if self._why.selected_index == 0 and self._why_shown is not run:
                    self._why_html.value = why_html(run)
                    self._why_shown = run
            self._cancel.layout.display = "" if self._cancellable and not run.done else "none"
            failed = run.status == "failed" and self._on_retry is not None and p.failed > 0
            self._retry.layout.display = "" if failed else "none"
            error = run.error
            if run.status == "failed" and error is not None:
                if self.show_error:
                    text = relabel(str(error), _shell())
                    self._error.value = f"<pre style='white-space:pre-wrap'>{html.escape(text)}</pre>"
                else:  # the cell's error shows the traceback, right below
                    self._error.value = (
                        f"<span class='durable-error' style='color:#b91c1c'>✖ {html.escape(last_line(str(error)))}"
                        f"</span> (traceback below)"
                    )

        def _function_stats(self) -> list[FunctionStats]:
            if self._stats is not None:
                return self._stats
            stats = self.run.function_stats()
            if self.run.done:
                self._stats = stats
            return stats

    return RunWidget()


def hidden_layout() -> Any:
    import ipywidgets as widgets

    return widgets.Layout(display="none")


def why_html(run: Run) -> str:
    """The widget's form of ``%durable_why``: the calls that ran first, at most CALL_ROWS."""
    try:
        return run.explain().html(limit=CALL_ROWS)
    except Exception as exc:  # the store unreachable, the row pruned: said, never raised into a comm
        return f"<span class='durable-note'>cannot explain this run: {html.escape(str(exc))}</span>"


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


def make_view(
    run: Run,
    *,
    quiet: bool = False,
    show_error: bool = True,
    cancellable: bool = True,
    on_retry: Callable[[Run], Any] | None = None,
) -> Any:
    """A widget in Jupyter, a text view elsewhere, nothing with ``quiet`` (options: :func:`make_widget`)."""
    if quiet:
        return None
    if widgets_available():
        return make_widget(run, show_error=show_error, cancellable=cancellable, on_retry=on_retry)
    return TextView(run, show_error=show_error)
