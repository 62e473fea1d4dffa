"""Where notebook functions run: a backend per kind, each opening one executor per execution.

Executors are registered by name (:mod:`.registry`), with the settings each takes:

- ``threads`` (default): :class:`~.threads.ThreadExecutor` in the kernel's process (``workers``);
- ``rq``: jobs on RQ workers (:mod:`.rq`, ``url``, ``queue``), needs the ``rq`` extra;
- ``dask``: tasks on a ``distributed`` cluster (:mod:`.dask`, ``address``), needs the ``dask`` extra;
- others through :func:`register_executor` or the entry-point group ``durable_monty_nb.executors``.

A backend is anything with ``name``, ``remote``, ``check()`` (raise before anything runs when it
cannot work) and ``open(run) -> Executor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .. import defaults
from ..store.signing import Signer
from .base import Executor
from .registry import (
    ENTRY_POINT_GROUP,
    ExecutorEntry,
    create_backend,
    executor_entry,
    executor_names,
    register_executor,
    unregister_executor,
)
from .threads import ThreadExecutor

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "ExecutorEntry",
    "RunContext",
    "Threads",
    "backend",
    "create_backend",
    "executor_entry",
    "executor_names",
    "register_executor",
    "unregister_executor",
]


@dataclass(frozen=True)
class RunContext:
    """What an executor knows of the execution it serves."""

    execution_id: str
    key: str
    store_url: str
    signer: Signer


class Backend(Protocol):
    name: str
    remote: bool  # tasks run in other processes: functions are shipped to the store first

    def check(self) -> None:
        """Raise ExecutorUnavailable (before anything runs) when tasks cannot be dispatched."""
        ...

    def open(self, run: RunContext) -> Executor: ...


@dataclass(frozen=True)
class Threads:
    """Threads of this process: ``workers`` per execution."""

    workers: int = defaults.WORKERS
    name: str = "threads"
    remote = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")

    def check(self) -> None:
        return None

    def open(self, run: RunContext) -> Executor:
        return ThreadExecutor(self.workers, name=f"durable-{run.key[:20]}")


register_executor("threads", Threads, settings=("workers",))
register_executor("rq", "durable_monty_nb.executors.rq:RQ", settings=("url", "queue"))
register_executor("dask", "durable_monty_nb.executors.dask:Dask", settings=("address",))


def backend(spec: str | Backend | None, *, workers: int | None = None, **settings: Any) -> Backend:
    """The backend of the executor named ``spec`` (default ``threads``) with ``settings``, or ``spec`` itself."""
    if spec is None or isinstance(spec, str):
        return create_backend(spec or defaults.EXECUTOR, settings, workers=workers)
    return spec
