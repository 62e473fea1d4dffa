"""The time the driver's components read: the system's, or a settable one for unit tests.

Components get the current time from the loop's hooks (``admit(states, now)``,
``timer(state, now)``) or, when a hook has none, from ``loop.clock``. A :class:`ManualClock`
moves only when told to, so a test of timeouts, rates and RetryAfter delays steps through
seconds without waiting for them.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (``time.time()`` for the system clock)."""
        ...


class SystemClock:
    """The wall clock of this machine."""

    def now(self) -> float:
        return time.time()


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that stands still until :meth:`advance` or :meth:`set` moves it."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (never back); the new time."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self._now += seconds
        return self._now

    def set(self, when: float) -> None:
        """Move to ``when`` (not before the current time)."""
        self.advance(when - self._now)
