"""Why each call of an execution was reused or ran again (``run.explain()``, ``%durable_why``).

Read from the store only: an execution's call rows say which calls were served from which
earlier execution (``reused_from``); its fingerprints (see :func:`.engine.prepare_inputs`) and
those of the execution before it say, for a call that ran, what changed: the function's code,
a global it reads (by name), a helper it reaches, or its arguments.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..store.store import UNFINISHED, Store
from ..values import ValueCodec, format_arguments, short_repr


@dataclass(frozen=True)
class CallReason:
    """One call: ``outcome`` is reused, ran, failed or pending; ``source`` the execution it came from."""

    call_id: int
    function: str
    args: str
    outcome: str
    source: str | None
    reason: str


@dataclass
class Explanation:
    """What an execution reused and ran again, and why."""

    execution_id: str
    key: str
    status: str
    previous_id: str | None
    decisions: list[str] = field(default_factory=list)
    calls: list[CallReason] = field(default_factory=list)

    def call(self, function: str, index: int = 0) -> CallReason:
        """The ``index``-th call of ``function`` (KeyError when there is none)."""
        found = [c for c in self.calls if c.function == function]
        if index >= len(found):
            raise KeyError(f"{function!r} has {len(found)} calls in execution {self.execution_id[:12]}")
        return found[index]

    @property
    def reused(self) -> list[CallReason]:
        return [c for c in self.calls if c.outcome == "reused"]

    @property
    def ran(self) -> list[CallReason]:
        return [c for c in self.calls if c.outcome != "reused"]

    def counts(self) -> str:
        reused = len(self.reused)
        return f"{reused} {'call' if reused == 1 else 'calls'} reused, {len(self.ran)} ran here"

    def text(self) -> str:
        head = [f"execution {self.execution_id[:12]} of {self.key!r} ({self.status})"]
        head += [f"  {line}" for line in self.decisions]
        head.append(f"  {self.counts()}")
        rows = [(str(c.call_id), c.function, c.args, c.outcome, c.reason) for c in self.calls]
        if not rows:
            return "\n".join(head)
        titles = ("call", "function", "arguments", "outcome", "why")
        widths = [max(len(t), *(len(r[i]) for r in rows)) for i, t in enumerate(titles[:-1])]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)) + "  " + cells[-1]

        return "\n".join([*head, "", line(titles), *(line(r) for r in rows)])

    def _repr_html_(self) -> str:
        return self.html()

    def html(self, limit: int | None = None) -> str:
        """The HTML table; ``limit``: at most that many rows, the calls that ran first (the
        widget's form, which names ``%durable_why`` for the rest)."""
        esc = html.escape
        decisions = "".join(f"<li>{esc(d)}</li>" for d in self.decisions)
        calls = self.calls
        more = ""
        if limit is not None and len(calls) > limit:
            calls = sorted(calls, key=lambda c: c.outcome == "reused")[:limit]
            more = f"<p>{len(self.calls) - limit} more; <code>%durable_why {esc(self.key)}</code> lists every call.</p>"
        body = "".join(
            f"<tr><td>{c.call_id}</td><td><code>{esc(c.function)}</code></td><td><code>{esc(c.args)}</code></td>"
            f"<td>{esc(c.outcome)}</td><td>{esc(c.reason)}</td></tr>"
            for c in calls
        )
        return (
            f'<div class="durable-why"><b>execution {esc(self.execution_id[:12])}</b> of '
            f"<code>{esc(self.key)}</code> ({esc(self.status)}): {esc(self.counts())}<ul>{decisions}</ul>"
            "<table><thead><tr><th>call</th><th>function</th><th>arguments</th><th>outcome</th><th>why</th>"
            f"</tr></thead><tbody>{body}</tbody></table>{more}</div>"
        )

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return self.text()


def explain(store: Store, execution_id: str, *, cached: bool = False) -> Explanation:
    """The explanation of one execution (``cached``: a re-run answered with its stored result)."""
    row = store.get_execution(execution_id)
    prints = _prints(row.fingerprints)
    previous = store.get_execution(row.previous_id) if row.previous_id else None
    before = _prints(previous.fingerprints) if previous is not None else {}
    result = Explanation(row.id, row.key, row.status, row.previous_id)
    result.decisions = _decisions(row, prints, previous, before, cached)
    earlier: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    earlier_order: dict[str, list[str]] = defaultdict(list)
    if previous is not None:
        for _, function, kind, args, fingerprint, status, *_ in store.load_calls(previous.id):
            if kind == "call":
                earlier[function, args].append((fingerprint, status))
                earlier_order[function].append(args)
    seen: dict[str, int] = defaultdict(int)
    for call in store.load_calls(row.id):
        call_id, function, kind, args, fingerprint, status = call[:6]
        reused_from = call[15]
        if kind != "call":
            continue
        nth = seen[function]
        seen[function] += 1
        shown = format_arguments(args)
        if reused_from is not None:
            reason = f"the same function, inputs and arguments as in execution {reused_from[:12]}"
            result.calls.append(CallReason(call_id, function, shown, "reused", reused_from, reason))
            continue
        outcome = "ran" if status == "done" else status
        why = _why_ran(function, args, fingerprint, nth, prints, before, previous, earlier, earlier_order)
        result.calls.append(CallReason(call_id, function, shown, outcome, None, why))
    return result


def _prints(text: str | None) -> dict[str, Any]:
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _decisions(row: Any, prints: dict[str, Any], previous: Any, before: dict[str, Any], cached: bool) -> list[str]:
    lines = []
    if cached:
        lines.append(f"this run returned the stored result of execution {row.id[:12]}: nothing it reads changed")
    if previous is None:
        lines.append("the first execution of this workflow: every call ran")
        return lines
    if prints.get("rerun"):
        lines.append("started fresh on request (--rerun): every call ran again")
    if prints.get("rerun_functions"):
        lines.append(f"the calls of {', '.join(prints['rerun_functions'])} ran again on request (--rerun-fn)")
    changes = []
    if previous.code_hash != row.code_hash:
        changes.append("the code")
    changes += [f"the value of {name}" for name in _changed(before.get("reads", {}), prints.get("reads", {}))]
    changes += [f"function {name}" for name in _changed(before.get("functions", {}), prints.get("functions", {}))]
    what = ", ".join(changes) or "nothing it reads"
    if previous.status in UNFINISHED:
        lines.append(
            f"execution {previous.id[:12]} was {previous.status}; it was not resumed because {what} changed "
            f"since: a new execution reused its completed calls that are still valid"
        )
    else:
        lines.append(f"changed since execution {previous.id[:12]}: {what}")
    return lines


def _changed(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))


def _why_ran(
    function: str,
    args: str,
    fingerprint: str,
    nth: int,
    prints: dict[str, Any],
    before: dict[str, Any],
    previous: Any,
    earlier: dict[tuple[str, str], list[tuple[str, str]]],
    earlier_order: dict[str, list[str]],
) -> str:
    if prints.get("rerun"):
        return "re-run on request (--rerun)"
    if function in prints.get("rerun_functions", ()):
        return f"re-run on request (--rerun-fn {function})"
    unhashable = prints.get("unhashable", {}).get(function)
    if unhashable:
        listed = "; ".join(
            f"{_part_label(part)} is a {what.split(' (')[0]}" for part, what in sorted(unhashable.items())
        )
        return f"{function} reads what cannot be hashed ({listed}): its calls run every time"
    if previous is None:
        return "first execution"
    same_args = earlier.get((function, args), [])
    if not same_args:
        if function not in earlier_order:
            return f"{function} was not called in execution {previous.id[:12]}"
        return _new_arguments(function, args, nth, earlier_order[function], previous.id)
    if any(fp == fingerprint for fp, _ in same_args):
        statuses = {status for fp, status in same_args if fp == fingerprint}
        if "done" in statuses:
            return "a class of an argument changed (its code)"
        return f"it had not completed in execution {previous.id[:12]} ({', '.join(sorted(statuses))})"
    old = before.get("parts", {}).get(function)
    new = prints.get("parts", {}).get(function)
    if old is None or new is None:
        return f"{function} changed (its fingerprint differs from execution {previous.id[:12]})"
    changed = describe_changes(old, new)
    return f"{function} changed: {'; '.join(changed) if changed else 'its fingerprint'}"


def _new_arguments(function: str, args: str, nth: int, order: list[str], previous_id: str) -> str:
    """Which argument differs from the same-numbered call of the function in the execution before."""
    if nth < len(order):
        try:
            old_args, old_kwargs = ValueCodec().decode_display(order[nth])
            new_args, new_kwargs = ValueCodec().decode_display(args)
        except (ValueError, TypeError, KeyError):
            return f"new arguments (no call {function}({format_arguments(args)}) in execution {previous_id[:12]})"
        diffs = []
        for i in range(max(len(old_args), len(new_args))):
            a = old_args[i] if i < len(old_args) else "-"
            b = new_args[i] if i < len(new_args) else "-"
            if a != b:
                diffs.append(f"argument {i}: {short_repr(a, 30)} -> {short_repr(b, 30)}")
        for name in sorted(set(old_kwargs) | set(new_kwargs)):
            if old_kwargs.get(name, "-") != new_kwargs.get(name, "-"):
                diffs.append(
                    f"argument {name}: {short_repr(old_kwargs.get(name, '-'), 30)} -> "
                    f"{short_repr(new_kwargs.get(name, '-'), 30)}"
                )
        if diffs:
            return f"new arguments: {'; '.join(diffs)} (call {nth + 1} of {function} in {previous_id[:12]})"
    return f"new arguments (no call {function}({format_arguments(args)}) in execution {previous_id[:12]})"


def describe_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The parts of a function's fingerprint that differ, most specific first, as sentences."""
    changed = sorted(part for part in set(old) | set(new) if old.get(part) != new.get(part))
    # A changed helper shows as its changed parts, not as itself as well.
    leaves = [part for part in changed if not any(other.startswith(part + "/") for other in changed)]
    out = []
    for part in leaves:
        label = _part_label(part)
        if part not in old:
            out.append(f"now reads {label}")
        elif part not in new:
            out.append(f"no longer reads {label}")
        else:
            out.append(f"{label} changed")
    return out


def _part_label(part: str) -> str:
    *chain, leaf = part.split("/")
    kind, _, name = leaf.partition(":")
    labels = {
        "code": "its code",
        "global": f"global {name}",
        "closure": f"closure variable {name}",
        "default": f"default value {name}",
        "self": "the object of the method",
        "arg": f"bound argument {name}",
        "class": "the class's code",
        "declared": "its declared fingerprint",
        "name": "the library function",
        "func": "the function",
    }
    text = labels.get(kind, leaf)
    if chain:
        owners = [c.partition(":")[2] or c for c in chain]
        if kind == "code":
            text = "the code"
        text = f"{text} of {' -> '.join(reversed(owners))}"
    return text
