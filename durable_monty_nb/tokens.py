"""Capability tokens: HMAC-signed with the store's signing key, scoped, optionally expiring.

A token is ``dm1.<payload>.<signature>``: the payload is compact JSON (base64url) naming what the
bearer may do, the signature an HMAC-SHA256 of it under the store's key (the key that signs the
rows, :class:`~durable_monty_nb.store.signing.Signer`, in a context of its own). Scopes:

- ``{"e": execution id, "s": signal}``: deliver that signal to that execution (and read its status);
- ``{"e": execution id, "c": call id, "a": attempt}``: complete that attempt of an external call;
- ``{"e": execution id, "k": "cancel"}``: cancel that execution (and read its status);
- ``{"admin": true}``: everything, on every execution of the store.

``"x"`` is an optional expiry (UNIX time). Tokens are bearer secrets: they are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

from .errors import DurableError
from .store.signing import Signer

PREFIX = "dm1"
CONTEXT = "capability-token"
MAX_TOKEN_LENGTH = 1024


class TokenError(DurableError):
    """A token that is missing, malformed, forged or expired (HTTP 401)."""

    http_status = 401


@dataclass(frozen=True)
class Scope:
    """What a verified token allows."""

    admin: bool = False
    execution_id: str | None = None
    signal: str | None = None
    call_id: int | None = None
    attempt: int | None = None
    expires_at: float | None = None
    cancel: bool = False

    def allows_signal(self, execution_id: str, signal: str) -> bool:
        return self.admin or (self.execution_id == execution_id and self.signal == signal and self.call_id is None)

    def allows_cancel(self, execution_id: str) -> bool:
        return self.admin or (self.execution_id == execution_id and self.cancel)

    def allows_status(self, execution_id: str) -> bool:
        return self.admin or self.execution_id == execution_id

    def describe(self) -> str:
        if self.admin:
            what = "admin (every execution)"
        elif self.call_id is not None:
            what = f"complete call {self.call_id} (attempt {self.attempt}) of execution {self.execution_id}"
        elif self.cancel:
            what = f"cancel execution {self.execution_id}"
        else:
            what = f"signal {self.signal!r} of execution {self.execution_id}"
        if self.expires_at is not None:
            what += f", until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.expires_at))}"
        return what


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(signer: Signer, payload: dict[str, Any], expires_in: float | None = None) -> str:
    payload = dict(payload)
    if expires_in is not None:
        payload["x"] = int(time.time() + expires_in)
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{PREFIX}.{body}.{signer.sign(CONTEXT, body.encode())}"


def signal_token(signer: Signer, execution_id: str, signal: str, expires_in: float | None = None) -> str:
    return make_token(signer, {"e": execution_id, "s": signal}, expires_in)


def call_token(signer: Signer, execution_id: str, call_id: int, attempt: int, expires_in: float | None = None) -> str:
    return make_token(signer, {"e": execution_id, "c": call_id, "a": attempt}, expires_in)


def cancel_token(signer: Signer, execution_id: str, expires_in: float | None = None) -> str:
    return make_token(signer, {"e": execution_id, "k": "cancel"}, expires_in)


def admin_token(signer: Signer, expires_in: float | None = None) -> str:
    return make_token(signer, {"admin": True}, expires_in)


def verify_token(signer: Signer, token: Any, now: float | None = None) -> Scope:
    """The scope of a genuine, unexpired token; TokenError otherwise (never says which part failed)."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("missing or malformed token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError("missing or malformed token")
    _, body, signature = parts
    try:
        expected = signer.sign(CONTEXT, body.encode())
    except UnicodeEncodeError:
        raise TokenError("missing or malformed token") from None
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise TokenError("invalid token")
    try:
        payload = json.loads(_unb64(body))
    except (ValueError, binascii.Error):
        raise TokenError("missing or malformed token") from None
    if not isinstance(payload, dict):
        raise TokenError("missing or malformed token")
    expires = payload.get("x")
    if expires is not None and (not isinstance(expires, (int, float)) or (now or time.time()) >= expires):
        raise TokenError("expired token")
    if payload.get("admin") is True:
        return Scope(admin=True, expires_at=expires)
    execution_id = payload.get("e")
    if not isinstance(execution_id, str):
        raise TokenError("missing or malformed token")
    if "c" in payload:
        call_id, attempt = payload.get("c"), payload.get("a")
        if not isinstance(call_id, int) or not isinstance(attempt, int):
            raise TokenError("missing or malformed token")
        return Scope(execution_id=execution_id, call_id=call_id, attempt=attempt, expires_at=expires)
    if "k" in payload:
        if payload.get("k") != "cancel" or "s" in payload:
            raise TokenError("missing or malformed token")
        return Scope(execution_id=execution_id, cancel=True, expires_at=expires)
    signal = payload.get("s")
    if not isinstance(signal, str):
        raise TokenError("missing or malformed token")
    return Scope(execution_id=execution_id, signal=signal, expires_at=expires)
