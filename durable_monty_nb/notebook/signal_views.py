"""What views and status reports show of signal waits and external calls.

- Under a run that waits for a signal, the widget shows "waiting for signal 'approval'" with
  **Approve** / **Reject** buttons (values ``{"approved": true}`` / ``{"approved": false}``), a
  field for any JSON value with **Send**, and a ready ``curl`` line; an external call shows its
  completion URL.
- The text view prints how to deliver: the magic line and the command line.
- ``%durable_status NAME`` lists what the execution waits for and its mailbox.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from ..signals import Wait, base_url, waits_from_store
from ..store import mailbox
from ..store.store import Store
from .scope import display_name

APPROVE = {"approved": True}
REJECT = {"approved": False}


def _store_url(run: Any) -> str:
    store = getattr(getattr(run, "_source", None), "store", None)
    return getattr(store, "display_url", "") or "URL"


def describe_wait(wait: Wait) -> str:
    if wait.kind == "signal":
        due = f" (until {time.strftime('%H:%M:%S', time.localtime(wait.due_at))})" if wait.due_at else ""
        return f"waiting for signal {wait.name!r}{due}"
    return f"waiting for the completion of {wait.name}() (call {wait.call_id}, attempt {wait.attempt})"


def delivery_lines(run: Any, wait: Wait) -> list[str]:
    """How to answer a wait, as lines for a terminal."""
    if wait.kind == "signal":
        return [
            describe_wait(wait) + "; deliver it with",
            f"  %durable_signal {display_name(run.key)} {wait.name} '{json.dumps(APPROVE)}'",
            f"  durable-monty-nb signal --db '{_store_url(run)}' {run.execution_id} {wait.name} "
            f"'{json.dumps(APPROVE)}'",
        ]
    return [describe_wait(wait) + ":", f"  {curl_complete(wait.url(run.execution_id))}"]


def curl_signal(run: Any, wait: Wait, value: Any = APPROVE) -> str:
    return (
        f"curl -X POST {base_url()}/executions/{run.execution_id}/signals/{wait.name} "
        f"-H 'Authorization: Bearer {wait.token}' -H 'Content-Type: application/json' "
        f"-d '{json.dumps({'value': value})}'"
    )


def curl_complete(url: str) -> str:
    return f"curl -X POST {url} -H 'Content-Type: application/json' -d '{{\"value\": ...}}'"


class WaitAnnouncer:
    """For text views: print the delivery lines of each wait once, when it appears."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, int]] = set()

    def lines(self, run: Any) -> list[str]:
        out: list[str] = []
        for wait in run.waits():
            if (wait.call_id, wait.attempt) not in self._seen:
                self._seen.add((wait.call_id, wait.attempt))
                out += delivery_lines(run, wait)
        return out


def make_signal_panel(run: Any) -> Any:
    """A VBox under the run's widget: one row per waited signal name, one per external call."""
    import ipywidgets as widgets

    class SignalPanel(widgets.VBox):
        def __init__(self) -> None:
            super().__init__([])
            self.add_class("durable-signals")
            self._shown: tuple[Any, ...] = ()
            self._message = widgets.HTML()

        def refresh(self) -> None:
            waits = run.waits()
            key = tuple((w.kind, w.name, w.call_id if w.kind == "external" else 0, w.attempt) for w in waits)
            if key == self._shown:
                return
            self._shown = key
            rows: list[Any] = []
            names_done: set[str] = set()
            for wait in waits:
                if wait.kind == "signal":
                    if wait.name in names_done:
                        continue
                    names_done.add(wait.name)
                    rows.append(self._signal_row(wait))
                else:
                    rows.append(self._external_row(wait))
            self.children = [*rows, self._message] if rows else []

        def _deliver(self, name: str, value: Any) -> None:
            try:
                delivery = run.signal(name, value, source="widget")
            except Exception as exc:  # shown, never raised into the frontend's handler
                self._message.value = f"<span class='durable-signal-error'>{html.escape(str(exc))}</span>"
                return
            self._message.value = f"<span class='durable-signal-sent'>sent {html.escape(name)!s} #{delivery.seq}</span>"

        def _signal_row(self, wait: Wait) -> Any:
            label = widgets.HTML(f"<b class='durable-waiting'>{html.escape(describe_wait(wait), quote=False)}</b>")
            approve = widgets.Button(description="Approve", button_style="success", icon="check")
            reject = widgets.Button(description="Reject", button_style="danger", icon="times")
            field = widgets.Text(placeholder='any JSON value, e.g. {"approved": true, "note": "ok"}')
            send = widgets.Button(description="Send")
            approve.add_class("durable-approve")
            reject.add_class("durable-reject")
            field.add_class("durable-signal-value")
            send.add_class("durable-send")
            approve.on_click(lambda _: self._deliver(wait.name, APPROVE))
            reject.on_click(lambda _: self._deliver(wait.name, REJECT))

            def send_value(_: Any) -> None:
                try:
                    value = json.loads(field.value or "null")
                except ValueError as exc:
                    self._message.value = f"<span class='durable-signal-error'>not JSON: {html.escape(str(exc))}</span>"
                    return
                self._deliver(wait.name, value)

            send.on_click(send_value)
            curl = widgets.HTML(
                f"<details><summary>deliver over HTTP</summary><code style='white-space:pre-wrap'>"
                f"{html.escape(curl_signal(run, wait))}</code></details>"
            )
            return widgets.VBox([label, widgets.HBox([approve, reject, field, send]), curl])

        def _external_row(self, wait: Wait) -> Any:
            url = wait.url(run.execution_id)
            return widgets.HTML(
                f"<b>{html.escape(describe_wait(wait), quote=False)}</b><br><code style='white-space:pre-wrap'>"
                f"{html.escape(curl_complete(url))}</code>"
            )

        def __repr__(self) -> str:
            return "SignalPanel()"

    return SignalPanel()


def waits_section(store: Store, row: Any) -> tuple[str, str] | None:
    """(text, html) of what an execution waits for and of its mailbox, or None when both are empty."""
    waits = waits_from_store(store, row.id) if row.status != "completed" else []
    deliveries = mailbox.mailbox(store, row.id)
    if not waits and not deliveries:
        return None
    text: list[str] = []
    parts: list[str] = []
    if waits:
        text.append("waiting for:")
        items = []
        for wait in waits:
            line = describe_wait(wait)
            if wait.kind == "signal":
                how = f"%durable_signal {display_name(row.key)} {wait.name} '{json.dumps(APPROVE)}'"
            else:
                how = f"POST {wait.url(row.id)}"
            text.append(f"  {line}: {how}")
            items.append(f"<li>{html.escape(line)}: <code>{html.escape(how)}</code></li>")
        parts.append(f"<p>waiting for:</p><ul>{''.join(items)}</ul>")
    if deliveries:
        text.append("mailbox:")
        cells = []
        for d in deliveries:
            taken = f"consumed by call {d.consumed_by}" if d.consumed_by is not None else "waiting for a wait"
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.created_at))
            value = d.value if len(d.value) <= 60 else d.value[:59] + "…"
            text.append(f"  #{d.seq} {d.name} = {value} ({d.source}, {when}; {taken})")
            cells.append(
                "<tr>"
                + "".join(
                    f"<td style='text-align:left'>{html.escape(str(c))}</td>"
                    for c in (d.seq, d.name, value, d.source, when, taken)
                )
                + "</tr>"
            )
        head = "".join(f"<th style='text-align:left'>{h}</th>" for h in ("#", "signal", "value", "from", "at", "state"))
        parts.append(
            f"<table class='durable-mailbox'><caption style='text-align:left'>mailbox</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(cells)}</tbody></table>"
        )
    return "\n".join(text), "\n".join(parts)
