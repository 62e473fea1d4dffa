"""Status reports of a store: a table of executions, or the detail of one, as HTML and text."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.detached import driven_by, state_of
from ..errors import last_line
from ..store.retention import StoreSize, format_bytes
from ..store.store import Store, execution_state
from ..values import format_arguments
from .scope import split_key

DETAIL_CALL_LIMIT = 50
CALL_HEADERS = ["call", "function", "arguments", "status", "attempts", "duration", "worker", "error"]


@dataclass
class Report:
    """A table (or a detail page) that renders as HTML in notebooks and as text elsewhere."""

    text: str
    html: str

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.text)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_time(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else ""


def status_report(
    store: Store,
    name: str | None = None,
    *,
    show_all: bool = False,
    relabel: Callable[[str], str] | None = None,
    live: dict[str, Any] | None = None,
) -> Report:
    """The executions of a store, or the detail of one (``relabel`` rewrites its traceback's
    frames; ``live``: the progress of the runs this process drives, by execution id)."""
    if name:
        return detail_report(store, store.find_execution(name), relabel=relabel, live=live)
    rows = store.list_executions(latest_only=not show_all)
    runners = driven_by(store, [row for row in rows if row.status != "completed" or show_all])
    return executions_report(
        rows, store.display_url, store.sizes(), per_workflow=not show_all, live=live, runners=runners
    )


def progress_text(row: Any, live: dict[str, Any] | None = None) -> str:
    """done/total of an execution: ``40/40`` once it ended; while it runs, the total its code
    tells (``12/40``, from the run's progress in this process), else the calls announced so far
    with a ``+`` (``12/13+``: a loop, or a run of another process, may make more)."""
    if row.status != "running":
        return f"{row.calls_done}/{row.calls_total}"
    progress = (live or {}).get(row.id)
    if progress is not None and progress.expected is not None:
        return f"{progress.done}/{progress.expected}"
    if progress is not None:
        return f"{progress.done}/{progress.total}+"
    return f"{row.calls_done}/{row.calls_total}+"


def outage_report(error: Exception, runs: Sequence[Any], where: str) -> Report:
    """While the store cannot be read: the outage, and the runs of this process as they know themselves."""
    notes = [p.note for p in (run.progress for run in runs) if p.note]
    headline = f"{where}: {notes[0] if notes else last_line(str(error))}"
    headers = ["name", "status", "progress", "failed", "note", "id"]
    body = []
    for run in runs:
        p = run.progress
        body.append(
            [
                split_key(run.key)[1],
                run.status,
                f"{p.done}/{p.total}",
                str(p.failed),
                p.note or "",
                run.execution_id[:12],
            ]
        )
    if not body:
        return Report(headline, f"<p>{html.escape(headline)}</p>")
    caption = f"{headline}; the runs of this kernel, from memory:"
    return Report(caption + "\n" + text_table(headers, body), html_table(headers, body, caption))


def executions_report(
    rows: Sequence[Any],
    where: str,
    size: StoreSize | None = None,
    *,
    per_workflow: bool = True,
    live: dict[str, Any] | None = None,
    runners: dict[str, str] | None = None,
) -> Report:
    """One line per execution; a notebook column when some were run from a notebook (scoped keys).

    With the store's ``size``: its total in the caption and, one line per workflow, the number of
    its executions and the bytes they take (``runs``, ``size``). With ``runners`` (detached runs:
    :func:`~durable_monty_nb.engine.detached.driven_by`), a ``runner`` column says who drives each.
    """
    scoped = any(split_key(row.key)[0] for row in rows)
    sized = size is not None and per_workflow
    headers = [
        "name",
        *(["notebook"] if scoped else []),
        "status",
        "progress",
        "failed",
        "started",
        "duration",
        *(["runs", "size"] if sized else []),
        *(["runner"] if runners else []),
        "id",
    ]
    now = time.time()
    body = []
    for row in rows:
        end = row.finished_at or (now if row.status == "running" else row.updated_at)
        notebook, name = split_key(row.key)
        body.append(
            [
                name,
                *([notebook or ""] if scoped else []),
                _state(row, runners),
                progress_text(row, live),
                str(row.calls_failed),
                format_time(row.created_at),
                format_duration(end - row.created_at),
                *(_workflow_size(size, row.key) if sized else []),
                *([runners.get(row.id, "")] if runners else []),
                row.id[:12],
            ]
        )
    total = f" ({format_bytes(size.total_bytes)})" if size is not None and size.total_bytes is not None else ""
    if not body:
        message = f"no executions in {where}{total}"
        return Report(message, f"<p>{html.escape(message)}</p>")
    caption = f"{len(body)} execution(s) in {where}{total}"
    return Report(caption + "\n" + text_table(headers, body), html_table(headers, body, caption))


def _state(row: Any, runners: dict[str, str] | None) -> str:
    """The status, with ``handed over`` for a detached run no runner drives (not a crash)."""
    return state_of(row, bool(runners) and row.id in runners)


def _workflow_size(size: Any, key: str) -> list[str]:
    found = size.workflows.get(key)
    if found is None:
        return ["", ""]
    return [str(found.executions), format_bytes(found.bytes)]


def detail_report(
    store: Store, row: Any, *, relabel: Callable[[str], str] | None = None, live: dict[str, Any] | None = None
) -> Report:
    calls = store.load_calls(row.id)
    notebook, name = split_key(row.key)
    runner = driven_by(store, [row])
    facts = [
        ("name", name),
        *([("notebook", notebook)] if notebook else []),
        ("id", row.id),
        ("status", _state(row, runner)),
        *([("runner", runner[row.id])] if runner else []),
        ("calls", f"{progress_text(row, live)} done, {row.calls_failed} failed, {row.calls_reused} reused"),
        ("started", format_time(row.created_at)),
        ("finished", format_time(row.finished_at)),
        ("duration", format_duration((row.finished_at or time.time()) - row.created_at)),
        ("monty", row.monty_version),
        ("store", store.display_url),
    ]
    chosen, more = select_calls(calls, DETAIL_CALL_LIMIT)
    shown = sorted(chosen, key=lambda c: c.call_id)
    body = []
    for call in shown:
        duration = call.finished_at - call.started_at if call.finished_at and call.started_at else None
        body.append(
            [
                str(call.call_id),
                call.function,
                format_arguments(call.args, item_limit=30, limit=60),
                "reused" if call.reused_from else call.status,
                str(call.attempts),
                format_duration(duration),
                call.worker or "",
                short_text(last_line(call.error), 80) if call.status in ("failed", "retrying") else "",
            ]
        )
    note = f"… and {more} more calls (done)" if more > 0 else ""
    headers, body = call_columns(body)
    text_parts = ["\n".join(f"{k:>9}: {v}" for k, v in facts), text_table(headers, body) if body else "no calls"]
    html_parts = [
        "<table>"
        + "".join(
            f"<tr><th style='text-align:right'>{html.escape(k)}</th><td style='text-align:left'>"
            f"{html.escape(str(v))}</td></tr>"
            for k, v in facts
        )
        + "</table>",
        html_table(headers, body, "calls") if body else "<p>no calls</p>",
    ]
    if note:
        text_parts.append(note)
        html_parts.append(f"<p>{html.escape(note)}</p>")
    from .signal_views import waits_section  # what it waits for (signals, external calls) and its mailbox

    section = waits_section(store, row)
    if section is not None:
        text_parts.append(section[0])
        html_parts.append(section[1])
    if row.error:
        error = relabel(row.error) if relabel is not None else row.error
        text_parts.append("traceback of the failure:\n" + error)
        html_parts.append(f"<details open><summary>traceback</summary><pre>{html.escape(error)}</pre></details>")
    return Report("\n\n".join(text_parts), "\n".join(html_parts))


def call_columns(rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The call table's headers and rows, without the worker column when no call ran on a worker."""
    worker = CALL_HEADERS.index("worker")
    if any(row[worker] for row in rows):
        return CALL_HEADERS, rows
    return CALL_HEADERS[:worker] + CALL_HEADERS[worker + 1 :], [row[:worker] + row[worker + 1 :] for row in rows]


def select_calls(calls: Sequence[Any], limit: int) -> tuple[list[Any], int]:
    """Calls that need attention (failures first), then the most recent finished ones, ``limit`` at
    most; and how many were left out. Works on call views and on stored call rows alike."""
    order = {"failed": 0, "retrying": 1, "running": 2, "queued": 3, "waiting": 4, "pending": 5}
    finished = ("done", "reused")
    urgent = sorted((c for c in calls if c.status not in finished), key=lambda c: (order.get(c.status, 9), c.call_id))
    done = [c for c in calls if c.status in finished]
    chosen = urgent[:limit] if len(urgent) >= limit else urgent + done[-(limit - len(urgent)) :]
    return chosen, len(calls) - len(chosen)


def short_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def html_table(headers: list[str], rows: list[list[str]], caption: str = "", css_class: str = "durable-status") -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    title = f"<caption style='text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    return f"<table class='{css_class}'>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def unfinished_summary(rows: Sequence[Any]) -> list[str]:
    return [
        f"{split_key(r.key)[1]} ({execution_state(r)}, {r.calls_done}/{r.calls_total} calls done, id {r.id[:12]})"
        for r in rows
    ]
