"""Which call the code running right now belongs to: the execution, call id and attempt.

Set around each attempt of a notebook function: by the driver in the context an in-process
task runs in (threads and the asyncio loop), by :func:`.worker.run_attempt` on remote workers.
Durable units of work inside a call (the model requests and tool calls of a pydantic-ai agent,
:mod:`durable_monty_nb.agents`) are journaled in the store under it, so a later attempt of the
same call, in this process or another, replays them instead of doing them again.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class CurrentCall:
    """The attempt running in this context; ``store`` is the execution's :class:`~..store.store.Store`."""

    store: Any
    execution_id: str
    call_id: int
    attempt: int
    function: str
    _runs: Any = field(default_factory=itertools.count, repr=False)

    def next_run(self) -> int:
        """0, 1, 2, ...: the place of an agent run among the runs this attempt started (deterministic
        when the function is: a later attempt numbers its runs alike)."""
        return next(self._runs)


_CURRENT: ContextVar[CurrentCall | None] = ContextVar("durable_monty_nb.current_call", default=None)


_SCOPES: list[Callable[[], contextlib.AbstractContextManager[Any]]] = []


def add_call_scope(factory: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
    """Enter ``factory()`` around every attempt from now on (layers above register theirs: the
    agents module keeps replayed units out of traces with pydantic-ai's ``replay_scope``)."""
    if factory not in _SCOPES:
        _SCOPES.append(factory)


def current_call() -> CurrentCall | None:
    """The call whose attempt runs in this context, or None outside any durable call."""
    return _CURRENT.get()


def enter_call(store: Any, task: Any) -> None:
    """Mark the context of an in-process task (``task.local``) as running the task's attempt.

    The context ends with the attempt. Scopes registered with :func:`add_call_scope` need an exit,
    so when there are any the task's function is wrapped to enter and leave them around its call.
    """
    local = task.local
    current = CurrentCall(store, task.execution_id, task.call_id, task.attempt, task.function)
    local.context.run(_CURRENT.set, current)
    if _SCOPES:
        local.fn = _scoped(local.fn)


def _scoped(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with contextlib.ExitStack() as scopes:
                for factory in _SCOPES:
                    scopes.enter_context(factory())
                return await fn(*args, **kwargs)

        return run_async

    def run(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as scopes:
            for factory in _SCOPES:
                scopes.enter_context(factory())
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def running_call(store: Any, execution_id: str, call_id: int, attempt: int, function: str) -> Iterator[CurrentCall]:
    """The same, for the duration of a block (remote workers)."""
    current = CurrentCall(store, execution_id, call_id, attempt, function)
    token = _CURRENT.set(current)
    try:
        with contextlib.ExitStack() as scopes:
            for factory in _SCOPES:
                scopes.enter_context(factory())
            yield current
    finally:
        _CURRENT.reset(token)
