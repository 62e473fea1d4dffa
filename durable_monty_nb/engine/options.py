"""The options of a run, in one place, checked once.

```python
from durable_monty_nb import Engine, RunOptions

options = RunOptions(workers=8, timeout=30, rate="10/s")
engine.start(code, namespace, key="train", options=options)
```

``Engine.start``, ``Engine.resume`` and ``Engine.run`` take a ``RunOptions`` (``options=``) and
also each field as a keyword (which wins over ``options``); unset fields (None) take the engine's.
The magics build one from their options and ``%config``: their ``--executor``, ``--workers``,
``--retries`` ... are declared from :data:`ARGUMENTS` (:func:`add_arguments`, for any argparse
parser) and read back with :func:`options_from_arguments`, so every value is checked here, once.
A new option is one field here (with its :class:`Argument`) and the component that uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .controls import CallControls, Rate
from .retry import BACKOFFS, RetryPolicy


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


@dataclass(frozen=True)
class Argument:
    """The command-line form of a run option: ``--dest`` (dashes for underscores) and what argparse takes."""

    dest: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``add_argument`` for it."""
        found: dict[str, Any] = {"dest": self.dest, "help": self.help, "default": self.default}
        if self.type is not None:
            found["type"] = self.type
        if self.choices is not None:
            found["choices"] = self.choices
        return found


ARGUMENTS: dict[str, Argument] = {
    argument.dest: argument
    for argument in (
        Argument("executor", "Where the notebook functions run: threads (default), rq, dask or a registered one."),
        Argument("workers", "Threads for the notebook functions (default 32).", int),
        Argument("retries", "Retries for functions without their own @retry policy.", int),
        Argument("backoff", "Backoff between retries (with --retries).", choices=BACKOFFS, default="exponential"),
        Argument("delay", "Seconds before the first retry (with --retries).", float, default=1.0),
        Argument("max_delay", "Longest wait between retries (with --retries).", float, default=60.0),
        Argument("timeout", "Seconds a call may run before TimeoutError (functions without @limits).", float),
        Argument("concurrency", "Most calls of one function running at once (across the kernel's runs).", int),
        Argument("rate", "Most call starts of one function per second or minute, e.g. 10/s or 100/min."),
    )
}
RETRY_ARGUMENTS = ("retries", "backoff", "delay", "max_delay")  # together they make ``retry``


def add_arguments(add: Callable[..., Any], names: Iterable[str] = tuple(ARGUMENTS)) -> None:
    """Declare the run options ``names`` through ``add(flag, **kwargs)``: an argparse parser's
    ``add_argument`` (or a decorator factory such as IPython's ``argument``)."""
    for name in names:
        argument = ARGUMENTS[name]
        add(argument.flag, **argument.kwargs())


def options_from_arguments(args: Any, fallback: Mapping[str, Any] | None = None) -> RunOptions:
    """The options of parsed arguments (``argparse.Namespace``); an option not given takes its
    ``fallback`` value (``%config``), else None (the engine's). ``--retries`` makes the retry
    policy with ``--backoff``, ``--delay`` and ``--max-delay``.

    Raises ValueError (or TypeError) for a value out of range, as :class:`RunOptions` does.
    """
    fallback = fallback or {}

    def chosen(name: str) -> Any:
        value = getattr(args, name, None)
        return fallback.get(name) if value is None else value

    retry = None
    if chosen("retries") is not None:
        defaults = {name: ARGUMENTS[name].default for name in RETRY_ARGUMENTS}
        values = {name: chosen(name) if chosen(name) is not None else defaults[name] for name in RETRY_ARGUMENTS}
        retry = RetryPolicy(**values)
    return RunOptions(
        workers=chosen("workers"),
        retry=retry,
        timeout=chosen("timeout"),
        concurrency=chosen("concurrency"),
        rate=chosen("rate"),
        executor=chosen("executor"),
    )
