"""Command line: ``durable-monty-nb upgrade --db URL`` and ``durable-monty-nb status --db URL``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="durable-monty-nb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    upgrade = commands.add_parser("upgrade", help="bring a store to this release's schema (Alembic)")
    upgrade.add_argument("--db", required=True, help="SQLAlchemy URL or SQLite file of the store")
    status = commands.add_parser("status", help="list the executions of a store")
    status.add_argument("--db", default=None, help="SQLAlchemy URL or SQLite file (default: durable_monty.db)")
    status.add_argument("name", nargs="?", help="a key or execution id for its details")
    status.add_argument("--all", action="store_true", help="every execution, not only the latest of each key")
    args = parser.parse_args(argv)

    if args.command == "upgrade":
        from .store.schema import upgrade as run_upgrade
        from .store.store import normalize_url

        print(f"store at schema version {run_upgrade(normalize_url(args.db))}")
        return 0

    from .notebook.status import status_report
    from .store.store import Store

    print(status_report(Store(args.db), args.name, show_all=args.all).text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
