"""Events a running execution emits; views subscribe, the driver never knows who listens."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    execution_id: str


@dataclass(frozen=True)
class ExecutionStarted(Event):
    key: str
    resumed: bool
    restored_calls: int
    reused_calls: int


@dataclass(frozen=True)
class Printed(Event):
    stream: str
    text: str


@dataclass(frozen=True)
class CallRetrying(Event):
    call_id: int
    function: str
    attempt: int
    wait: float
    error: str


@dataclass(frozen=True)
class CallFailed(Event):
    call_id: int
    function: str
    attempts: int
    error: str


@dataclass(frozen=True)
class ExecutionFinished(Event):
    status: str  # completed | failed | interrupted
    error: str | None


Listener = Callable[[Event], None]


class EventBus:
    """Thread-safe fan-out of events to listeners; a failing listener is logged, not raised."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners = [*self._listeners, listener]

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = [item for item in self._listeners if item is not listener]

        return unsubscribe

    def emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken view must not break the execution
                log.exception("event listener %r failed", listener)
