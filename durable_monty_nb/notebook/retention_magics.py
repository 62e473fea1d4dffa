"""Magics that keep the store small: ``%durable_forget`` and ``%durable_prune``."""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..store.store import Store
from .scope import scoped_key


def workflow_target(durable: Any, store: Store, name_or_id: str) -> str:
    """What a user means by NAME: this notebook's workflow of that name, else a key, else an execution id."""
    key = scoped_key(durable.notebook(store), name_or_id)
    if key != name_or_id and store.latest_execution(key) is not None:
        return key
    return name_or_id


@magics_class
class RetentionMagics(Magics):
    """``%durable_forget`` removes a workflow; ``%durable_prune`` removes old completed executions."""

    def __init__(self, shell: Any, durable: Any) -> None:
        super().__init__(shell=shell)
        self._durable = durable  # the DurableMagics: its stores and settings

    @magic_arguments()
    @argument("name", help="A workflow name (all its executions) or an execution id.")
    @argument("--force", action="store_true", help="Even if a live process runs it (that run stops).")
    @argument("--vacuum", action="store_true", help="Give the freed space back to the disk.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @line_magic
    def durable_forget(self, line: str) -> None:
        """Remove a workflow (or one execution) with its calls, checkpoints, attempts, signals and the
        stored values and shipped functions nothing else uses. Refused while a live process runs it,
        unless ``--force``. Running the cell again afterwards starts from nothing."""
        args = parse_argstring(self.durable_forget, line)
        engine = self._durable.engine(args.db)
        target = workflow_target(self._durable, engine.store, args.name)
        print(engine.forget(target, force=args.force, vacuum=args.vacuum).summary())

    @magic_arguments()
    @argument("--older-than", help="Only executions finished longer ago: 7d, 12h, 30m, 45s.")
    @argument("--keep-latest", type=int, default=1, help="Completed executions kept per workflow (default 1).")
    @argument("--dry-run", action="store_true", help="Print what would go and the space it frees; change nothing.")
    @argument("--vacuum", action="store_true", help="Give the freed space back to the disk.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @line_magic
    def durable_prune(self, line: str) -> None:
        """Remove completed executions, keeping the latest of each workflow (``--keep-latest N``) and
        every one that did not complete; re-runs and edited cells still reuse what was kept."""
        args = parse_argstring(self.durable_prune, line)
        engine = self._durable.engine(args.db)
        removal = engine.prune(
            older_than=args.older_than, keep_latest=args.keep_latest, dry_run=args.dry_run, vacuum=args.vacuum
        )
        print(removal.summary())
