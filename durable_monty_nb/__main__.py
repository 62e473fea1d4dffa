"""Command line: ``upgrade`` a store, list its ``status``, say ``why`` calls were reused or ran,
``forget`` a workflow, ``prune`` old executions, run an RQ ``worker`` with the package preloaded, run a
``runner`` that drives detached runs (``%%durable NAME --detach``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="durable-monty-nb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    upgrade = commands.add_parser("upgrade", help="bring a store to this release's schema (Alembic)")
    upgrade.add_argument("--db", required=True, help="SQLAlchemy URL or SQLite file of the store")
    status = commands.add_parser("status", help="list the executions of a store")
    status.add_argument(
        "--db", default=None, help="SQLAlchemy URL or SQLite file (default: .durable/durable_monty.db here)"
    )
    status.add_argument("name", nargs="?", help="a key or execution id for its details")
    status.add_argument("--all", action="store_true", help="every execution, not only the latest of each key")
    why = commands.add_parser("why", help="which calls of an execution were reused, and why the others ran again")
    why.add_argument("--db", default=None, help="SQLAlchemy URL or SQLite file (default: the store here)")
    why.add_argument("name", help="a key (its latest execution) or an execution id")
    forget = commands.add_parser(
        "forget", help="remove a workflow (or one execution) with its calls and the values only it uses"
    )
    forget.add_argument("name", help="a workflow name (key) for all its executions, or an execution id")
    forget.add_argument("--db", default=None, help="SQLAlchemy URL or SQLite file of the store")
    forget.add_argument("--force", action="store_true", help="even if a live process runs it (it stops)")
    forget.add_argument("--vacuum", action="store_true", help="give the freed space back to the disk")
    prune = commands.add_parser(
        "prune", help="remove completed executions, keeping the latest of each workflow and every unfinished one"
    )
    prune.add_argument("--db", default=None, help="SQLAlchemy URL or SQLite file of the store")
    prune.add_argument("--older-than", default=None, help="only executions finished longer ago: 7d, 12h, 30m, 45s")
    prune.add_argument("--keep-latest", type=int, default=1, help="completed executions kept per workflow (default 1)")
    prune.add_argument("--dry-run", action="store_true", help="print what would go and the space it frees")
    prune.add_argument("--vacuum", action="store_true", help="give the freed space back to the disk")
    worker = commands.add_parser(
        "worker",
        help="an RQ worker for durable calls, with durable-monty-nb imported once before jobs fork "
        "(a plain `rq worker` works too, but imports it again for every job)",
    )
    worker.add_argument("queues", nargs="*", help="queues to listen on (default: durable-monty)")
    worker.add_argument("--url", default=None, help="Redis URL (default: $DURABLE_MONTY_RQ_URL or the local server)")
    worker.add_argument("--name", default=None, help="worker name (default: RQ's)")
    worker.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    worker.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE once before jobs fork (repeat for several): the modules your functions "
        "import (pandas, torch, pydantic_ai...) then cost nothing per job",
    )
    runner = commands.add_parser(
        "runner",
        help="drive the detached runs of a store (%%%%durable NAME --detach), taking over those of runners that died",
    )
    runner.add_argument("--db", required=True, help="SQLAlchemy URL or SQLite file of the store")
    runner.add_argument("--rq-url", default=None, help="Redis URL of runs on the rq executor")
    runner.add_argument("--rq-queue", default=None, help="RQ queue of runs on the rq executor")
    runner.add_argument("--dask-address", default=None, help="Dask scheduler of runs on the dask executor")
    runner.add_argument("--workers", type=int, default=None, help="threads per run of the threads executor")
    runner.add_argument("--max-runs", type=int, default=None, help="most runs driven at once (default: no limit)")
    runner.add_argument("--lease-ttl", type=float, default=None, help="seconds a silent runner keeps a run")
    runner.add_argument("--poll", type=float, default=0.5, help="seconds between looks for runs to claim")
    runner.add_argument("--name", default=None, help="how status views name this runner")
    from .server.cli import COMMANDS as SERVER_COMMANDS
    from .server.cli import add_commands, run_command

    add_commands(commands)  # signal, token, serve
    args = parser.parse_args(argv)
    if args.command in SERVER_COMMANDS:
        return run_command(args)

    if args.command == "runner":
        return run_runner(args)

    if args.command == "worker":
        return run_worker(args.queues, url=args.url, name=args.name, burst=args.burst, preload=args.preload)

    if args.command in ("forget", "prune"):
        return run_retention(args)

    if args.command == "upgrade":
        from .store.schema import upgrade as run_upgrade
        from .store.store import normalize_url

        print(f"store at schema version {run_upgrade(normalize_url(args.db))}")
        return 0

    from .errors import DurableError
    from .notebook.status import status_report
    from .store.store import Store

    if args.command == "why":
        from .engine.why import explain
        from .errors import DurableError

        store = Store(args.db)
        try:
            print(explain(store, store.find_execution(args.name).id).text())
        except DurableError as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0

    try:
        print(status_report(Store(args.db), args.name, show_all=args.all).text)
    except DurableError as exc:  # an unknown name, a store of another release: one clear line
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def run_retention(args: argparse.Namespace) -> int:
    """``forget`` and ``prune``: what went (or would go) and the space, on stdout; refusals on stderr."""
    from .errors import DurableError
    from .store.store import Store

    try:
        store = Store(args.db)
        try:
            if args.command == "forget":
                removal = store.forget(args.name, force=args.force, vacuum=args.vacuum)
            else:
                removal = store.prune(
                    older_than=args.older_than,
                    keep_latest=args.keep_latest,
                    dry_run=args.dry_run,
                    vacuum=args.vacuum,
                )
        finally:
            store.close()
    except (DurableError, ValueError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(removal.summary())
    return 0


def run_runner(args: argparse.Namespace) -> int:
    """A runner until SIGTERM or Ctrl-C; the runs it drives then stop, for other runners to take over."""
    import signal
    import threading

    from . import defaults
    from .engine.runners import Runner
    from .errors import DurableError

    settings: dict[str, dict[str, object]] = {}
    if args.rq_url or args.rq_queue:
        settings["rq"] = {k: v for k, v in (("url", args.rq_url), ("queue", args.rq_queue)) if v}
    if args.dask_address:
        settings["dask"] = {"address": args.dask_address}
    try:
        runner = Runner(
            args.db,
            settings=settings,
            workers=args.workers,
            max_runs=args.max_runs,
            lease_ttl=args.lease_ttl or defaults.LEASE_TTL,
            poll=args.poll,
            name=args.name,
        )
    except (DurableError, ValueError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        runner.serve(stop)
    return 0


def run_worker(
    queues: list[str], *, url: str | None, name: str | None, burst: bool, preload: list[str] | None = None
) -> int:
    """An RQ worker whose forked jobs find the package (and the ``preload`` modules) imported and,
    when ``DURABLE_MONTY_DB`` names the store, that store opened with its SQL compiled."""
    import importlib

    import cloudpickle  # noqa: F401  (preloaded: jobs fork from this process)

    from . import defaults, values  # noqa: F401
    from .executors import backend as executor_backend
    from .executors.rq_worker import DurableWorker
    from .executors.worker import DB_ENV, prepare_store

    for module in preload or []:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(
                f"durable-monty-nb worker: cannot preload {module!r}: {exc} (install it, or fix --preload)",
                file=sys.stderr,
            )
            return 2
    backend = executor_backend("rq", url=url)
    backend.check()
    store_url = os.environ.get(DB_ENV)
    if store_url:  # opened and warmed once here, inherited by every forked job
        print(f"durable-monty-nb worker: store {prepare_store(store_url)} prepared", flush=True)
    worker = DurableWorker(queues or [defaults.RQ_QUEUE], connection=backend.connection(), name=name)
    worker.work(burst=burst, logging_level="INFO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
