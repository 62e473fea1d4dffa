"""What live views add to the counts: throughput, an ETA, and a per-function breakdown.

Views call these once per refresh (at most four times a second), never per call: the pace
keeps a few samples of the finished count, the breakdown is one pass over the calls.
"""

from __future__ import annotations

import html
import time
from collections import deque
from collections.abc import Sequence

from ..engine.run import FunctionStats, Progress
from .status import format_duration, text_table

WINDOW_SECONDS = 10.0  # throughput is measured over the last WINDOW_SECONDS
FUNCTION_ROWS = 20  # the breakdown shows this many functions at most (the busiest)
FUNCTION_HEADERS = ["function", "done", "running", "failed", "mean", "max"]


class Pace:
    """Recent throughput (finished calls per second) and the time left at that pace."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, progress: Progress, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        finished = progress.done + progress.failed - progress.restored - progress.reused  # ran here
        self._samples.append((now, finished))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    @property
    def rate(self) -> float | None:
        """Calls finished per second over the window; None until two samples a moment apart."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 0.5:
            return None
        return max(n1 - n0, 0) / (t1 - t0)

    def eta(self, progress: Progress, expected: int | None) -> float | None:
        """Seconds until the ``expected`` calls are finished at the recent pace (None: no pace
        yet, or no total known ahead)."""
        if expected is None:
            return None
        left = expected - progress.done - progress.failed
        rate = self.rate
        if left <= 0 or not rate:
            return None
        return left / rate

    def describe(self, progress: Progress, running: bool, expected: int | None = None) -> list[str]:
        """``12.5 calls/s`` and ``ETA 40.0 s`` while the run goes on; nothing before there is a
        pace, and no ETA when the code does not tell its total (``expected`` None: loops)."""
        rate = self.rate
        if not running or rate is None:
            return []
        parts = [f"{format_rate(rate)} calls/s"]
        eta = self.eta(progress, expected)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return parts


def format_rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


def breakdown_rows(stats: Sequence[FunctionStats], limit: int = FUNCTION_ROWS) -> tuple[list[list[str]], int]:
    """Rows of the per-function table (functions with failures first, then the most called)."""
    ordered = sorted(stats, key=lambda s: (-s.failed, -s.total))
    rows = [
        [
            s.function,
            f"{s.done}/{s.total}",
            str(s.running),
            str(s.failed),
            format_duration(s.mean),
            format_duration(s.longest),
        ]
        for s in ordered[:limit]
    ]
    return rows, max(len(ordered) - limit, 0)


def breakdown_html(stats: Sequence[FunctionStats]) -> str:
    if not stats:
        return ""
    rows, more = breakdown_rows(stats)
    cell = "style='text-align:{};padding:1px 14px 1px 0'"
    head = "".join(f"<th {cell.format('left' if i == 0 else 'right')}>{h}</th>" for i, h in enumerate(FUNCTION_HEADERS))
    body = "".join(
        "<tr>"
        + "".join(f"<td {cell.format('left' if i == 0 else 'right')}>{html.escape(c)}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    extra = f"<p>… and {more} more functions</p>" if more else ""
    return f"<table class='durable-functions'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{extra}"


def breakdown_text(stats: Sequence[FunctionStats]) -> str:
    if not stats:
        return ""
    rows, more = breakdown_rows(stats)
    return text_table(FUNCTION_HEADERS, rows) + (f"\n… and {more} more functions" if more else "")
