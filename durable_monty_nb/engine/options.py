"""The options of a run, in one place, checked once.

```python
from durable_monty_nb import Engine, RunOptions

options = RunOptions(workers=8, timeout=30, rate="10/s")
engine.start(code, namespace, key="train", options=options)
```

``Engine.start``, ``Engine.resume`` and ``Engine.run`` take a ``RunOptions`` (``options=``) and
also each field as a keyword (which wins over ``options``); unset fields (None) take the engine's.
The magics build one from their options and ``%config``. A new option is one field here and the
component that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .controls import CallControls, Rate
from .retry import RetryPolicy


@dataclass(frozen=True)
class RunOptions:
    """How one run goes; None: the engine's own (see :class:`~.engine.Engine`).

    - ``workers``: threads of the ``threads`` executor for this run;
    - ``retry``: the retry policy of functions without their own ``@retry``;
    - ``timeout`` (seconds), ``concurrency``, ``rate`` (``"10/s"``): the call controls of
      functions without their own ``@limits``;
    - ``executor``: a registered executor's name or a backend.
    """

    workers: int | None = None
    retry: RetryPolicy | None = None
    timeout: float | None = None
    concurrency: int | None = None
    rate: str | Rate | None = None
    executor: Any = None

    def __post_init__(self) -> None:
        if self.workers is not None:
            check_workers(self.workers)
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"retry is a RetryPolicy, not {self.retry!r}")
        self.controls  # noqa: B018  (raises ValueError for a bad timeout, concurrency or rate)

    @property
    def controls(self) -> CallControls:
        return CallControls.of(self.timeout, self.concurrency, self.rate)

    def with_overrides(self, **overrides: Any) -> RunOptions:
        """These options with the given fields set (None leaves a field as it is)."""
        unknown = set(overrides) - FIELDS
        if unknown:
            raise TypeError(f"unknown run option(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(FIELDS))})")
        chosen = {name: value for name, value in overrides.items() if value is not None}
        return replace(self, **chosen) if chosen else self


FIELDS = frozenset(f.name for f in fields(RunOptions))


def check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number of at least 1, not {workers!r}")
