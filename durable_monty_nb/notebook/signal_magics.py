"""Magics of signals and the HTTP server: ``%durable_signal`` and ``%durable_serve``."""

from __future__ import annotations

import contextlib
import json
import shlex
from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class

from ..errors import DurableError

SIGNAL_USAGE = "usage: %durable_signal [--db URL] [--idempotency-key KEY] NAME SIGNAL [JSON value]"


def parse_signal_line(line: str) -> tuple[dict[str, str], str, str, Any]:
    """(options, workflow name or id, signal, value); the JSON value may contain spaces."""
    options: dict[str, str] = {}
    rest = line.strip()
    while rest.startswith("--"):
        head, _, rest = rest.partition(" ")
        option = head[2:]
        if "=" in option:
            option, _, value = option.partition("=")
        else:
            value, _, rest = rest.strip().partition(" ")
        if option not in ("db", "idempotency-key") or not value:
            raise DurableError(SIGNAL_USAGE)
        options[option] = shlex.split(value)[0] if value[:1] in "'\"" else value
        rest = rest.strip()
    parts = rest.split(None, 2)
    if len(parts) < 2:
        raise DurableError(SIGNAL_USAGE)
    text = parts[2].strip() if len(parts) > 2 else "null"
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        with contextlib.suppress(ValueError):  # a shell-style quoted value: '{"approved": true}'
            text = shlex.split(text)[0]
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DurableError(f"the signal value is not JSON ({exc}): {text[:80]}") from None
    return options, parts[0], parts[1], value


@magics_class
class SignalMagics(Magics):
    """``%durable_signal`` delivers a signal; ``%durable_serve`` serves HTTP from this kernel."""

    def __init__(self, shell: Any, durable: Any) -> None:
        super().__init__(shell=shell)
        self._durable = durable  # the DurableMagics: its stores and settings
        self.server: Any = None

    @line_magic
    def durable_signal(self, line: str) -> None:
        """Deliver a signal: ``%durable_signal NAME SIGNAL [JSON]`` (the value defaults to null).

        NAME is a workflow name (its latest execution) or an execution id. The signal is kept
        until ``await signal(SIGNAL)`` takes it; ``--idempotency-key KEY`` ignores a repeat.
        """
        options, name, signal, value = parse_signal_line(line)
        engine = self._durable.engine(options.get("db"))
        row = engine.store.find_execution(name, notebook=self._durable.notebook(engine.store))  # this notebook's first
        delivery = engine.signal(row.id, signal, value, idempotency_key=options.get("idempotency-key"), source="magic")
        if delivery.duplicate:
            print(f"already delivered (idempotency key seen): {signal!r} #{delivery.seq}, ignored")
        else:
            print(f"delivered {signal!r} #{delivery.seq} to {name!r}")

    @line_magic
    def durable_serve(self, line: str) -> None:
        """Serve signals and external completions over HTTP from a thread of this kernel.

        ``%durable_serve [--host 127.0.0.1] [--port 8787] [--db URL]``; ``%durable_serve --stop``.
        Tokens: ``durable-monty-nb token ...``, or the curl lines of the widgets.
        """
        args = shlex.split(line)
        options = {"host": "127.0.0.1", "port": "8787", "db": None}
        stop = False
        while args:
            arg = args.pop(0)
            if arg == "--stop":
                stop = True
            elif arg.startswith("--") and arg[2:] in options and args:
                options[arg[2:]] = args.pop(0)
            else:
                raise DurableError("usage: %durable_serve [--host HOST] [--port PORT] [--db URL] | --stop")
        if stop or self.server is not None:
            if self.server is not None:
                self.server.stop()
                print(f"stopped serving on {self.server.url}")
                self.server = None
            if stop:
                return
        try:
            from ..server.app import BackgroundServer
        except ImportError as exc:
            raise DurableError(
                f"the server needs the server extra: pip install 'durable-monty-nb[server]' ({exc})"
            ) from None
        engine = self._durable.engine(options["db"])
        server = BackgroundServer(engine.store, options["host"], int(options["port"]), engine=engine)  # type: ignore[arg-type]
        server.start()
        self.server = server
        print(f"serving {engine.url} on {server.url} (signals: POST /executions/NAME/signals/SIGNAL)")
