"""Where notebook functions run: a backend per kind, each opening one executor per execution.

- ``threads`` (default): :class:`~.threads.ThreadExecutor` in the kernel's process;
- ``rq``: jobs on RQ workers (:mod:`.rq`), needs the ``rq`` extra;
- ``dask``: tasks on a ``distributed`` cluster (:mod:`.dask`), needs the ``dask`` extra.

A backend is anything with ``name``, ``check()`` (raise before anything runs when it cannot
work) and ``open(run) -> Executor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .. import defaults
from ..store.signing import Signer
from .base import Executor
from .threads import ThreadExecutor


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


EXECUTOR_NAMES = ("threads", "rq", "dask")


def backend(spec: str | Backend | None, *, workers: int = defaults.WORKERS) -> Backend:
    """The backend named by ``spec`` (``threads``, ``rq``, ``dask``) with its defaults, or ``spec`` itself."""
    if spec is None or spec == "threads":
        return Threads(workers)
    if spec == "rq":
        from .rq import RQ

        return RQ()
    if spec == "dask":
        from .dask import Dask

        return Dask()
    if isinstance(spec, str):
        raise ValueError(f"unknown executor {spec!r}: choose one of {', '.join(EXECUTOR_NAMES)}")
    return spec
