"""``%durable_why NAME``: which calls of a workflow's latest execution were reused, and why the
others ran again (an HTML table in a notebook, text in a terminal)."""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..engine.why import Explanation, explain
from .scope import display_name


@magics_class
class WhyMagics(Magics):
    """``%durable_why`` explains reuse; it reads the store of the ``DurableMagics`` it is given."""

    def __init__(self, shell: Any, durable: Any) -> None:
        super().__init__(shell=shell)
        self._durable = durable

    @magic_arguments()
    @argument("name", help="A workflow name or execution id.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @line_magic
    def durable_why(self, line: str) -> Explanation:
        """For each call of the workflow's latest execution: reused (from which execution) or ran,
        and for a call that ran again what changed (the function's code, which global, which
        argument)."""
        args = parse_argstring(self.durable_why, line)
        store = self._durable.engine(args.db).store
        row = store.find_execution(args.name, notebook=self._durable.notebook(store))
        run = self._durable.runs.get(row.key)
        # The run of this kernel knows whether it was answered with the stored result.
        found = run.explain() if run is not None and run.execution_id == row.id else explain(store, row.id)
        found.key = display_name(found.key)
        return found
