"""Human in the loop and external completion: durable signals and external calls.

Workflow code waits for a signal with ``await signal("approval", timeout=3600)`` (no import);
anyone with access to the store delivers it: ``engine.signal(name_or_id, "approval", value)``,
``%durable_signal``, ``durable-monty-nb signal``, the widget's buttons, or HTTP
(``durable-monty-nb serve``). See :mod:`durable_monty_nb.store.mailbox` for the semantics.

A notebook function decorated with :func:`external` is not run in the kernel: its call is
published with a completion token and URL (given to the decorator's ``hook``), and the outside
system completes it with ``POST /calls/{token}/complete`` (or :func:`complete_call`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import DurableError, ExecutionCompleted, NoSuchCall, ValueCrossingError
from .store import mailbox
from .store.mailbox import Delivery, SignalError, call_signal_name, check_name
from .store.store import Store
from .tokens import call_token, signal_token
from .values import ValueCodec

F = TypeVar("F", bound=Callable[..., Any])
EXTERNAL_ATTRIBUTE = "__durable_external__"
URL_ENV = "DURABLE_MONTY_URL"
DEFAULT_URL = "http://127.0.0.1:8787"
SIGNAL_FUNCTION = "signal"

__all__ = [
    "CompletionConflict",
    "Delivery",
    "ExternalCall",
    "ExternalSpec",
    "SignalError",
    "Wait",
    "complete_call",
    "deliver_signal",
    "external",
]


class CompletionConflict(DurableError):
    """A second, different completion of an external call (HTTP 409)."""

    http_status = 409


# -- external calls -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalSpec:
    hook: Callable[[ExternalCall], Any] | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class ExternalCall:
    """What the hook of an external function receives: the call, and how to complete it."""

    execution_id: str
    key: str
    call_id: int
    attempt: int
    function: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token: str
    url: str

    def curl(self) -> str:
        return f"curl -X POST {self.url} -H 'Content-Type: application/json' -d '{{\"value\": ...}}'"


def external(
    fn: F | None = None, *, hook: Callable[[ExternalCall], Any] | None = None, timeout: float | None = None
) -> Any:
    """Decorator: calls of this notebook function are completed from outside, not run in the kernel.

    ``hook(call)`` runs (in a thread of the kernel) when an attempt is published, after the
    checkpoint naming the call is committed: submit the job to Lambda, Modal, a queue, a person.
    Its ``call.url`` and ``call.token`` complete the attempt. A hook that raises fails the
    attempt; ``timeout`` (seconds) fails an attempt that no one completed in time with
    ``TimeoutError``. Failed attempts are retried by the function's ``@retry`` policy.
    """
    spec = ExternalSpec(hook, timeout)

    def decorate(function: F) -> F:
        setattr(function, EXTERNAL_ATTRIBUTE, spec)
        return function

    return decorate(fn) if fn is not None else decorate


def external_spec(fn: Any) -> ExternalSpec | None:
    return getattr(fn, EXTERNAL_ATTRIBUTE, None) if fn is not None else None


# -- where the HTTP server is ----------------------------------------------------------------------

_served_url: str | None = None


def set_served_url(url: str | None) -> None:
    """Record the URL of the server this process runs (``%durable_serve``)."""
    global _served_url
    _served_url = url


def base_url() -> str:
    """The server's URL: the one this process serves, else ``$DURABLE_MONTY_URL``, else the default."""
    return (_served_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def served_url() -> str | None:
    return _served_url


def completion_url(token: str) -> str:
    return f"{base_url()}/calls/{token}/complete"


# -- delivering -------------------------------------------------------------------------------------


def encode_value(value: Any) -> str:
    """A signal value in the store's codec; objects that need a stored pickle are refused."""
    codec = ValueCodec()
    text = codec.encode_text(value, what="the signal value")
    if codec.pending_blobs:
        raise ValueCrossingError(
            "a signal value must be plain data (JSON-like values, tuples, sets, dates, ...), not an object "
            "that needs a stored pickle"
        )
    return text


def deliver_signal(
    store: Store,
    name_or_id: str,
    signal: str,
    value: Any = None,
    *,
    idempotency_key: str | None = None,
    source: str = "engine",
    execution: Any = None,
) -> Delivery:
    """Deliver ``signal`` with ``value`` to an execution (the latest of a key, or an id).

    Kept in the execution's mailbox until a wait of that name takes it. A delivery with an
    idempotency key already seen by the execution is ignored (``Delivery.duplicate``).
    Raises SignalError for a completed execution or a bad name.
    """
    check_name(signal)
    row = execution if execution is not None else store.find_execution(name_or_id)
    if row.status == "completed":
        raise ExecutionCompleted(f"execution {row.id[:12]} ({row.key!r}) has completed: nothing waits for {signal!r}")
    return mailbox.deliver(store, row.id, signal, encode_value(value), idempotency_key=idempotency_key, source=source)


def complete_call(
    store: Store, token_scope: Any, value: Any = None, error: Any = None, *, source: str = "http"
) -> Delivery:
    """Complete an external call's attempt named by a verified call token's scope.

    ``error`` is ``{"type": "ValueError", "message": "..."}``. A second identical completion
    returns the first (``duplicate``); a different one raises CompletionConflict.
    """
    execution_id, call_id, attempt = token_scope.execution_id, token_scope.call_id, token_scope.attempt
    row = store.get_execution(execution_id)
    calls = {c.call_id: c for c in store.load_calls(execution_id)}
    call = calls.get(call_id)
    if call is None or call.kind != "call":
        raise NoSuchCall(f"execution {execution_id[:12]} has no external call {call_id}")
    payload = completion_payload(value, error)
    text = encode_value(payload)
    name = call_signal_name(call_id, attempt)
    if row.status == "completed" or call.status in ("done", "failed") or call.attempts >= attempt:
        existing = mailbox.find_by_key(store, execution_id, name)
        if existing is not None and existing.value_text == text:
            return existing
        raise CompletionConflict(f"call {call_id} (attempt {attempt}) of execution {execution_id[:12]} is already over")
    delivery = mailbox.deliver(store, execution_id, name, text, idempotency_key=name, source=source)
    if delivery.duplicate and delivery.value_text != text:
        raise CompletionConflict(
            f"call {call_id} (attempt {attempt}) of execution {execution_id[:12]} was already completed differently"
        )
    return delivery


def completion_payload(value: Any, error: Any) -> dict[str, Any]:
    if error is None:
        return {"value": value}
    if not isinstance(error, dict) or not isinstance(error.get("type", "Exception"), str):
        raise SignalError('"error" is {"type": "ValueError", "message": "..."}')
    type_name = error.get("type", "Exception") or "Exception"
    message = error.get("message", "")
    if not isinstance(message, str) or not type_name.isidentifier() or len(type_name) > 100:
        raise SignalError('"error" is {"type": "ValueError", "message": "..."}')
    return {"error": {"type": type_name, "message": message}}


# -- what a run waits for -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """A pending signal wait or external call of an execution."""

    call_id: int
    kind: str  # signal | external
    name: str  # the signal's name, or the external function's
    due_at: float | None = None
    attempt: int = 1
    token: str = ""  # the capability that completes it (signals: the signal token)

    def url(self, execution: str) -> str:
        if self.kind == "external":
            return completion_url(self.token)
        return f"{base_url()}/executions/{execution}/signals/{self.name}"


def signal_name_of(args_text: str) -> str:
    try:
        return str(json.loads(args_text)[0][0])
    except (ValueError, IndexError, TypeError, KeyError):
        return "?"


def signal_timeout_of(args_text: str) -> float | None:
    try:
        timeout = json.loads(args_text)[1].get("timeout")
    except (ValueError, IndexError, TypeError, AttributeError):
        return None
    return float(timeout) if isinstance(timeout, (int, float)) else None


def waits_from_store(store: Store, execution_id: str) -> list[Wait]:
    """The waits of an execution as its call rows record them (any process, dead or alive)."""
    waits = []
    for call in store.load_calls(execution_id):
        if call.status not in ("pending", "retrying"):
            continue
        if call.kind == "signal":
            name = signal_name_of(call.args)
            waits.append(
                Wait(call.call_id, "signal", name, call.due_at, 1, signal_token(store.signer, execution_id, name))
            )
        elif call.kind == "call" and (call.worker or "").startswith("external") and call.status == "pending":
            attempt = call.attempts + 1
            waits.append(
                Wait(
                    call.call_id,
                    "external",
                    call.function,
                    None,
                    attempt,
                    call_token(store.signer, execution_id, call.call_id, attempt),
                )
            )
    return waits
