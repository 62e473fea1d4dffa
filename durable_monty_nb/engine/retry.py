"""Retry policies for notebook functions.

```python
from durable_monty_nb import retry

@retry(retries=3, backoff="exponential", delay=0.5, max_delay=30)
def fetch(url): ...
```

A policy set on a function wins over the engine's default policy. Attempts are persisted, so
a restarted execution continues the schedule instead of starting it again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ..executors.base import ErrorInfo

Backoff = Literal["exponential", "linear", "constant"]
BACKOFFS: tuple[Backoff, ...] = ("exponential", "linear", "constant")
F = TypeVar("F", bound=Callable[..., Any])
POLICY_ATTRIBUTE = "__durable_retry__"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing call is tried again.

    ``retries`` is the number of extra attempts after the first. The wait before retry ``n``
    (1-based) is ``delay`` (constant), ``delay * n`` (linear) or ``delay * 2**(n-1)``
    (exponential), capped at ``max_delay``, then spread by +/- ``jitter`` (a fraction).
    Only exceptions that are instances of ``retry_on`` are retried.
    """

    retries: int = 0
    backoff: Backoff = "exponential"
    delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            problems.append(f"retries must be 0 or more, not {self.retries!r}")
        if self.backoff not in BACKOFFS:
            problems.append(f"backoff must be 'exponential', 'linear' or 'constant', not {self.backoff!r}")
        for name in ("delay", "max_delay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a number of seconds, 0 or more, not {value!r}")
        if not (isinstance(self.jitter, (int, float)) and 0 <= self.jitter <= 1):
            problems.append(f"jitter must be between 0 and 1, not {self.jitter!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    def should_retry(self, attempt: int, error: ErrorInfo | BaseException | None) -> bool:
        """After failed attempt number ``attempt`` (1-based), is there another one?

        ``error`` is matched against ``retry_on`` by class names (it may come from another
        process, where the exception class itself need not exist).
        """
        if attempt >= self.max_attempts:
            return False
        if error is None:
            return True
        if isinstance(error, BaseException):
            error = ErrorInfo.of(error, "")
        return error.is_a(self.retry_on)

    def wait_before(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1 for the first retry)."""
        if self.backoff == "constant":
            wait = self.delay
        elif self.backoff == "linear":
            wait = self.delay * retry_number
        else:
            wait = self.delay * 2 ** (retry_number - 1)
        wait = min(wait, self.max_delay)
        if self.jitter:
            wait *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(wait, 0.0)


NO_RETRY = RetryPolicy()


def retry(
    retries: int = 3,
    *,
    backoff: Backoff = "exponential",
    delay: float = 1.0,
    max_delay: float = 60.0,
    jitter: float = 0.0,
    retry_on: tuple[type[BaseException], ...] | type[BaseException] = Exception,
) -> Callable[[F], F]:
    """Decorator: give a notebook function its own retry policy."""
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    policy = RetryPolicy(
        retries=retries, backoff=backoff, delay=delay, max_delay=max_delay, jitter=jitter, retry_on=tuple(retry_on)
    )

    def decorate(fn: F) -> F:
        setattr(fn, POLICY_ATTRIBUTE, policy)
        return fn

    return decorate


def policy_for(fn: Any, default: RetryPolicy) -> RetryPolicy:
    return getattr(fn, POLICY_ATTRIBUTE, None) or default
