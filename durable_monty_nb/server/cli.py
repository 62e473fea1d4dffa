"""Commands ``signal``, ``token`` and ``serve`` of ``durable-monty-nb``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

COMMANDS = ("signal", "token", "serve")


def add_commands(commands: Any) -> None:
    """Add the subcommands to the parser's subparsers."""
    signal = commands.add_parser("signal", help="deliver a signal to a waiting (or future) signal() of an execution")
    signal.add_argument("--db", default=None, help="SQLAlchemy URL or SQLite file of the store")
    signal.add_argument("name", help="a workflow name (its latest execution) or an execution id")
    signal.add_argument("signal", help="the signal's name")
    signal.add_argument("value", nargs="?", default="null", help="its value, as JSON (default: null)")
    signal.add_argument("--idempotency-key", default=None, help="a second delivery with this key is ignored")

    token = commands.add_parser("token", help="print a capability token for the HTTP server")
    token.add_argument("--db", default=None, help="SQLAlchemy URL or SQLite file of the store")
    token.add_argument("name", nargs="?", help="a workflow name or execution id (not with --admin)")
    scope = token.add_mutually_exclusive_group(required=True)
    scope.add_argument("--signal", help="allow delivering this signal to the execution")
    scope.add_argument("--call", type=int, help="allow completing this external call (its current attempt)")
    scope.add_argument("--cancel", action="store_true", help="allow cancelling the execution")
    scope.add_argument("--admin", action="store_true", help="allow everything on every execution of the store")
    token.add_argument("--expires", type=float, default=None, help="seconds until the token expires")
    token.add_argument("--url", default=None, help="the server's URL for the curl line (default: $DURABLE_MONTY_URL)")

    serve = commands.add_parser("serve", help="serve signals and external call completions over HTTP")
    serve.add_argument("--db", default=None, help="SQLAlchemy URL or SQLite file of the store")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8787, help="port (default 8787)")


def run_command(args: argparse.Namespace) -> int:
    from ..errors import DurableError

    try:
        if args.command == "signal":
            return _signal(args)
        if args.command == "token":
            return _token(args)
        return _serve(args)
    except DurableError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _signal(args: argparse.Namespace) -> int:
    from ..signals import deliver_signal
    from ..store.store import Store

    try:
        value = json.loads(args.value)
    except ValueError as exc:
        print(f"the value is not JSON: {exc}", file=sys.stderr)
        return 2
    store = Store(args.db)
    try:
        delivery = deliver_signal(
            store, args.name, args.signal, value, idempotency_key=args.idempotency_key, source="cli"
        )
    finally:
        store.close()
    if delivery.duplicate:
        print(f"already delivered (idempotency key seen): {args.signal!r} #{delivery.seq}, ignored")
    else:
        print(f"delivered {args.signal!r} #{delivery.seq} to execution {delivery.execution_id[:12]}")
    return 0


def _token(args: argparse.Namespace) -> int:
    from .. import signals, tokens
    from ..store.store import Store

    store = Store(args.db)
    try:
        base = (args.url or signals.base_url()).rstrip("/")
        if args.admin:
            if args.name:
                print("--admin takes no workflow name", file=sys.stderr)
                return 2
            print(tokens.admin_token(store.signer, args.expires))
            return 0
        if not args.name:
            print("give a workflow name or execution id (or --admin)", file=sys.stderr)
            return 2
        row = store.find_execution(args.name)
        if args.signal is not None:
            from ..store.mailbox import check_name

            check_name(args.signal)
            token = tokens.signal_token(store.signer, row.id, args.signal, args.expires)
            print(token)
            print(curl_signal(base, row.key, args.signal, token), file=sys.stderr)
            return 0
        if args.cancel:
            token = tokens.cancel_token(store.signer, row.id, args.expires)
            print(token)
            print(curl_cancel(base, row.key, token), file=sys.stderr)
            return 0
        calls = {c.call_id: c for c in store.load_calls(row.id)}
        call = calls.get(args.call)
        if call is None:
            print(f"execution {row.id[:12]} has no call {args.call}", file=sys.stderr)
            return 1
        token = tokens.call_token(store.signer, row.id, call.call_id, call.attempts + 1, args.expires)
        print(token)
        print(curl_complete(f"{base}/calls/{token}/complete"), file=sys.stderr)
        return 0
    finally:
        store.close()


def curl_signal(base: str, execution: str, signal: str, token: str, value: str = '{"approved": true}') -> str:
    return (
        f"curl -X POST {base}/executions/{execution}/signals/{signal} -H 'Authorization: Bearer {token}' "
        f"-H 'Content-Type: application/json' -d '{{\"value\": {value}}}'"
    )


def curl_cancel(base: str, execution: str, token: str) -> str:
    return f"curl -X POST {base}/executions/{execution}/cancel -H 'Authorization: Bearer {token}'"


def curl_complete(url: str) -> str:
    return f"curl -X POST {url} -H 'Content-Type: application/json' -d '{{\"value\": ...}}'"


def _serve(args: argparse.Namespace) -> int:
    from .app import serve

    serve(args.db, host=args.host, port=args.port)
    return 0
