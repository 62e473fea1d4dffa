"""Call controls: a timeout, a concurrency limit and a start rate per notebook function.

```python
from durable_monty_nb import limits, RetryAfter

@limits(timeout=30, concurrency=1, rate="10/s")
def train(config): ...

def call_api(x):
    response = requests.get(...)
    if response.status_code == 429:
        raise RetryAfter(float(response.headers["Retry-After"]))
    return response.json()
```

Limits set on a function win over the run's defaults (``%%durable --timeout/--concurrency/--rate``).
Concurrency and rate are shared by every run of the process (a kernel): two runs calling
``train`` still run one training at a time. Rates are smooth: ``10/s`` starts a call every
0.1 s, never a burst of ten at each second boundary.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
CONTROLS_ATTRIBUTE = "__durable_limits__"
RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


class RetryAfter(Exception):
    """Raise in a notebook function to run the call again after ``seconds``.

    It is not a failed attempt (the retry policy does not count it), and the other calls of
    the same function wait too, as an API's ``Retry-After`` asks.
    """

    def __init__(self, seconds: float, reason: str = "") -> None:
        super().__init__(seconds, reason)
        self.seconds = max(float(seconds), 0.0)
        self.reason = reason

    @property
    def retry_after(self) -> float:
        """The delay, as executors read it (``ErrorInfo.retry_after``, across processes too)."""
        return self.seconds

    def __str__(self) -> str:
        return f"retry after {self.seconds:g} s" + (f": {self.reason}" if self.reason else "")


RETRY_AFTER_TYPE = f"{RetryAfter.__module__}.RetryAfter"


@dataclass(frozen=True)
class Rate:
    """``count`` call starts per ``per`` seconds, spaced evenly."""

    count: float
    per: float

    @property
    def interval(self) -> float:
        return self.per / self.count

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}.get(self.per, f"{self.per:g}s")
        return f"{self.count:g}/{unit}"

    @classmethod
    def parse(cls, text: str | Rate) -> Rate:
        """``"10/s"``, ``"100/min"``, ``"5/h"``."""
        if isinstance(text, Rate):
            return text
        found = _RATE.match(str(text).lower())
        if found is None or found.group(2) not in RATE_UNITS:
            raise ValueError(f"rate {text!r} is not N/s, N/min or N/h (for example '10/s' or '100/min')")
        count = float(found.group(1))
        if count <= 0:
            raise ValueError(f"rate {text!r} must allow at least one call (N > 0)")
        return cls(count, RATE_UNITS[found.group(2)])


@dataclass(frozen=True)
class CallControls:
    """The limits of one function's calls; None means no limit."""

    timeout: float | None = None
    concurrency: int | None = None
    rate: Rate | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {self.timeout!r}")
        if self.concurrency is not None and (
            isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1
        ):
            raise ValueError(f"concurrency must be a whole number of at least 1, not {self.concurrency!r}")

    @classmethod
    def of(cls, timeout: float | None = None, concurrency: int | None = None, rate: str | Rate | None = None) -> Any:
        return cls(None if timeout is None else float(timeout), concurrency, None if rate is None else Rate.parse(rate))

    def over(self, default: CallControls) -> CallControls:
        """These controls, with ``default``'s where these set none."""
        return replace(
            default,
            **{
                name: value for name in ("timeout", "concurrency", "rate") if (value := getattr(self, name)) is not None
            },
        )

    @property
    def limited(self) -> bool:
        return self.concurrency is not None or self.rate is not None


NO_LIMITS = CallControls()


def limits(*, timeout: float | None = None, concurrency: int | None = None, rate: str | Rate | None = None) -> Any:
    """Decorator: the call controls of a notebook function (see the module docstring)."""
    controls = CallControls.of(timeout, concurrency, rate)

    def decorate(fn: F) -> F:
        setattr(fn, CONTROLS_ATTRIBUTE, controls)
        return fn

    return decorate


def controls_for(fn: Any, default: CallControls) -> CallControls:
    own = getattr(fn, CONTROLS_ATTRIBUTE, None)
    return own.over(default) if isinstance(own, CallControls) else default


class Gate:
    """Admission of one function's calls in this process: concurrency slots and start times.

    Thread-safe; shared by every driver of the process. Drivers that wait for a slot leave a
    wake-up callback, called when a slot frees.
    """

    def __init__(self) -> None:
        self.running = 0
        self.next_start = 0.0  # time.time() of the next allowed start (rate and retry-after)
        self._lock = threading.Lock()
        self._waiters: dict[int, Callable[[], None]] = {}

    def admit(self, controls: CallControls, now: float) -> float | None:
        """Take a slot and a start now (returns 0.0), or say when to ask again.

        Returns the seconds to wait for a rate token, or None when all slots are taken (the
        caller is woken when one frees).
        """
        with self._lock:
            if controls.concurrency is not None and self.running >= controls.concurrency:
                return None
            if self.next_start > now:
                return self.next_start - now
            if controls.rate is not None:
                self.next_start = max(self.next_start, now) + controls.rate.interval
            self.running += 1
            return 0.0

    def release(self) -> None:
        with self._lock:
            self.running = max(self.running - 1, 0)
            waiters = list(self._waiters.values())
        for wake in waiters:
            wake()

    def hold_until(self, when: float) -> None:
        """No call of the function starts before ``when`` (a RetryAfter)."""
        with self._lock:
            self.next_start = max(self.next_start, when)

    def wait_for_slot(self, owner: int, wake: Callable[[], None]) -> None:
        with self._lock:
            self._waiters[owner] = wake

    def forget(self, owner: int) -> None:
        with self._lock:
            self._waiters.pop(owner, None)


GATES: dict[str, Gate] = {}
GATES_LOCK = threading.Lock()


def gate(function: str) -> Gate:
    """The process-wide gate of a function name."""
    found = GATES.get(function)
    if found is None:
        with GATES_LOCK:
            found = GATES.setdefault(function, Gate())
    return found
