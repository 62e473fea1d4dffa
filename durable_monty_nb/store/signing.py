"""HMAC signing of stored rows, with a key kept outside the database.

Snapshots and pickles are executable state: a row edited in the database must never be
loaded. Every blob, checkpoint and call result is stored with an HMAC-SHA256 over its
content and its identity (so a valid row cannot be moved to another execution either).

The key comes from, in order: the ``secret`` argument, the ``DURABLE_MONTY_KEY`` environment
variable, or a key file (``$DURABLE_MONTY_KEY_FILE``, default
``~/.config/durable-monty-nb/secret.key``) created with mode 0600 on first use. Processes that
share a store (other kernels, workers on other machines) must share the key.
"""

from __future__ import annotations

import hmac
import os
import secrets
import warnings
from pathlib import Path

from ..errors import TamperedDataError

KEY_ENV = "DURABLE_MONTY_KEY"
KEY_FILE_ENV = "DURABLE_MONTY_KEY_FILE"


def default_key_file() -> Path:
    explicit = os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "durable-monty-nb" / "secret.key"


def load_key(key: bytes | str | None = None) -> bytes:
    """Return the signing key, creating the key file if there is none yet."""
    if key is None:
        key = os.environ.get(KEY_ENV) or None
    if key is not None:
        return key.encode() if isinstance(key, str) else key
    path = default_key_file()
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    new_key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(new_key)
    return new_key


def secret_argument(secret: bytes | str | None, key: bytes | str | None, where: str) -> bytes | str | None:
    """The signing secret given as ``secret=``, or under its old name ``key=`` (deprecated: ``key``
    names a workflow, as in ``Engine.start(key=)``)."""
    if key is None:
        return secret
    if secret is not None:
        raise TypeError(f"{where}: give the signing secret once, as secret= (key= is its old name)")
    warnings.warn(
        f"{where}(key=...) is deprecated: the signing secret is secret=... (key= names a workflow)",
        DeprecationWarning,
        stacklevel=3,
    )
    return key


_JOIN_BELOW = 4096  # smaller data is joined to its context (one update), larger is not copied
SHORT_TAG = 32  # hex digits of a truncated HMAC-SHA256 tag (128 bits)


class Signer:
    """Signs and verifies stored content with the signing secret (see the module docstring)."""

    def __init__(self, secret: bytes | str | None = None) -> None:
        self._key = load_key(secret)
        # HMAC keyed once and copied for each tag (hmac's copy keeps the keyed inner and outer
        # states): the same tags as hmac.new with the key, in two thirds of the time; a gather
        # signs every result.
        self._keyed = hmac.new(self._key, digestmod="sha256")

    def sign(self, context: str, data: bytes) -> str:
        mac = self._keyed.copy()
        if len(data) < _JOIN_BELOW:
            mac.update(context.encode() + b"\0" + data)
        else:
            mac.update(context.encode() + b"\0")
            mac.update(data)
        return mac.hexdigest()

    def sign_text(self, context: str, text: str | None) -> str:
        return self.sign(context, (text or "").encode())

    def verify(self, context: str, data: bytes, signature: str | None, what: str, *, short: bool = False) -> None:
        """Raise TamperedDataError unless ``signature`` matches; ``what`` names the row.

        With ``short``, the first 32 hex digits of the HMAC (a 128-bit tag) are accepted too.
        """
        expected = self.sign(context, data)
        if short and signature is not None and len(signature) == SHORT_TAG:
            expected = expected[:SHORT_TAG]
        if not signature or not hmac.compare_digest(expected, signature):
            raise TamperedDataError(
                f"{what} failed its integrity check and was not loaded: the row was modified in the "
                f"database, or it was written with another signing key (set {KEY_ENV} or "
                f"{KEY_FILE_ENV} to the key of the process that wrote it)."
            )

    def verify_text(
        self, context: str, text: str | None, signature: str | None, what: str, *, short: bool = False
    ) -> None:
        self.verify(context, (text or "").encode(), signature, what, short=short)
