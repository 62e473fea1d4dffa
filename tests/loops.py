"""What every stand-in for the driver's loop in the component tests has (``components.Loop``):
functions by name, wakes counted, a heap of timers, a settable clock and a call book."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from durable_monty_nb.engine.driver.book import CallBook
from durable_monty_nb.engine.driver.calls import CallState
from durable_monty_nb.engine.driver.clock import ManualClock


class StandInLoop:
    def __init__(self, functions: dict[str, Any], start: float) -> None:
        self.functions = functions
        self.clock = ManualClock(start)
        self.book = CallBook()
        self.timers: list[tuple[float, int, int]] = []  # (due, order, call id), a heap
        self.seq = itertools.count()
        self.wakes = 0

    def function(self, name: str) -> Any:
        return self.functions.get(name)

    def wake(self) -> None:
        self.wakes += 1

    def push_timer(self, due: float, state: CallState) -> None:
        heapq.heappush(self.timers, (due, next(self.seq), state.call_id))

    def emit_retrying(self, state: CallState, wait: float, message: str) -> None:
        return None
