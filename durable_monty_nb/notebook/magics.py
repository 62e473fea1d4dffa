"""IPython magics: ``%%durable``, ``%durable_status``, ``%durable_resume``, ``%durable_cancel``.

A thin face over :class:`~durable_monty_nb.Engine`: it picks the store, passes the notebook's
namespace, shows a view and exports the workflow's names when it completes.

Store selection, first found: ``--db URL``; ``%config DurableMagics.db_url = ...`` (or
``c.DurableMagics.db_url`` in ipython_config.py); the ``DURABLE_MONTY_DB`` environment variable;
``durable_monty.db`` in the working directory (the notebook's folder).

Executor selection: ``--executor threads|rq|dask``, else ``%config DurableMagics.executor``;
RQ reads ``rq_url`` and ``rq_queue``, Dask ``dask_address`` (none: a local cluster of this kernel).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Enum, Int, TraitError, Unicode, validate

from .. import defaults
from ..engine.driver import default_printer
from ..engine.engine import Engine
from ..engine.handle import Run
from ..engine.retry import RetryPolicy
from ..errors import DurableError, ExecutionInterrupted
from ..executors import EXECUTOR_NAMES, Backend, Threads
from ..store.schema import read_revision
from ..store.store import DEFAULT_DB_FILE, normalize_url
from .status import status_report, unfinished_summary
from .views import make_view, summary, widgets_available

DB_ENV = "DURABLE_MONTY_DB"


@magics_class
class DurableMagics(Magics):
    """Durable notebook cells. Configurable with ``%config DurableMagics.<option> = value``."""

    db_url = Unicode(None, allow_none=True, help="Store of durable cells (SQLAlchemy URL or SQLite path).").tag(
        config=True
    )
    workers = Int(defaults.WORKERS, help="Threads per execution for notebook functions.").tag(config=True)
    lease_ttl = Int(
        int(defaults.LEASE_TTL), help="Seconds before another kernel may take over a silent execution."
    ).tag(config=True)
    executor = Enum(EXECUTOR_NAMES, default_value=defaults.EXECUTOR, help="Where notebook functions run.").tag(
        config=True
    )
    rq_url = Unicode(None, allow_none=True, help="Redis URL of the rq executor (default: the local server).").tag(
        config=True
    )
    rq_queue = Unicode(defaults.RQ_QUEUE, help="RQ queue of the rq executor.").tag(config=True)
    dask_address = Unicode(
        None, allow_none=True, help="Dask scheduler address of the dask executor (none: a local cluster)."
    ).tag(config=True)

    @validate("workers", "lease_ttl")
    def _positive(self, proposal: Any) -> int:
        if proposal["value"] < 1:
            raise TraitError(f"DurableMagics.{proposal['trait'].name} must be at least 1, not {proposal['value']}")
        return proposal["value"]

    @validate("rq_queue")
    def _queue_name(self, proposal: Any) -> str:
        if not proposal["value"].strip():
            raise TraitError("DurableMagics.rq_queue must name a queue")
        return proposal["value"]

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self.runs: dict[str, Run] = {}
        self.resume_panel: Any = None  # the panel of unfinished executions shown by %load_ext

    # -- stores -----------------------------------------------------------------------------

    def store_url(self, option: str | None = None) -> str:
        return normalize_url(option or self.db_url or os.environ.get(DB_ENV) or str(Path.cwd() / DEFAULT_DB_FILE))

    def engine(self, option: str | None = None) -> Engine:
        url = self.store_url(option)
        with self._lock:
            if url not in self._engines:
                self._engines[url] = Engine(url, workers=self.workers, lease_ttl=float(self.lease_ttl))
            return self._engines[url]

    # -- %%durable --------------------------------------------------------------------------

    @magic_arguments()
    @argument("name", nargs="?", help="Name of the workflow (its key in the store). Default: from the cell.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @argument("--executor", choices=EXECUTOR_NAMES, help="Where the notebook functions run (default: threads).")
    @argument("--workers", type=int, help="Threads for the notebook functions of this cell (default 32).")
    @argument("--background", action="store_true", help="Return at once; names are set when it completes.")
    @argument("--rerun", action="store_true", help="Start fresh: run every call again.")
    @argument("--retries", type=int, help="Retries for functions without their own @retry policy.")
    @argument(
        "--backoff",
        choices=("exponential", "linear", "constant"),
        default="exponential",
        help="Backoff between retries (with --retries).",
    )
    @argument("--delay", type=float, default=1.0, help="Seconds before the first retry (with --retries).")
    @argument("--max-delay", type=float, default=60.0, help="Longest wait between retries (with --retries).")
    @argument("--quiet", action="store_true", help="No progress view.")
    @cell_magic
    def durable(self, line: str, cell: str) -> Any:
        """Run the cell durably: calls to notebook functions run in threads, every result is stored,
        and the cell picks up where it stopped after a kernel restart.

        The last expression is the cell's result; names the cell assigns at top level are set in
        the notebook when it completes.
        """
        args = parse_argstring(self.durable, line)
        if not cell.strip():
            raise DurableError("the %%durable cell is empty: write the workflow code below the magic line")
        executor = self.backend(args.executor, args.workers)
        engine = self.engine(args.db)
        retry = None
        if args.retries is not None:
            retry = RetryPolicy(retries=args.retries, backoff=args.backoff, delay=args.delay, max_delay=args.max_delay)
        printer = HeldPrinter()  # prints made while the run starts appear below its view, in order
        try:
            run = engine.start(
                cell,
                self.shell.user_ns,
                key=args.name or self._cell_key(cell),
                rerun=args.rerun,
                executor=executor,
                retry=retry,
                print_callback=printer,
                paused=True,
            )
        except BaseException:
            printer.release()
            raise
        return self._follow(run, background=args.background, quiet=args.quiet, printer=printer)

    def backend(self, name: str | None, workers: int | None = None) -> Backend:
        """The executor backend of a cell: ``--executor``, else ``%config DurableMagics.executor``."""
        if workers is not None and workers < 1:
            raise DurableError(f"--workers must be at least 1, not {workers}")
        name = name or self.executor
        if name == "rq":
            from ..executors.rq import RQ

            return RQ(self.rq_url, self.rq_queue) if self.rq_url else RQ(queue=self.rq_queue)
        if name == "dask":
            from ..executors.dask import Dask

            return Dask(self.dask_address) if self.dask_address else Dask()
        return Threads(workers or self.workers)

    def _cell_key(self, cell: str) -> str | None:
        """Without a name: the notebook cell's id (stable across edits), else derived from the code."""
        kernel = getattr(self.shell, "kernel", None)
        try:
            cell_id = kernel.get_parent()["metadata"].get("cellId") if kernel is not None else None
        except Exception:
            cell_id = None
        return f"cell-{cell_id[:12]}" if cell_id else None

    def _follow(self, run: Run, *, background: bool, quiet: bool, printer: HeldPrinter | None = None) -> Any:
        """Show the run; wait for it (unless in the background); export its names."""
        view = self._show(run, quiet)
        if printer is not None:
            printer.release()
        run.begin()
        if background:
            self._export_later(run)
            return None
        _wait_all(
            [run],
            f"stopped waiting for {run.key!r}. Calls already running finish in the background and their "
            f"results are kept; nothing is lost. Continue with: %durable_resume {run.key}",
        )
        if view is not None:
            view.join(5)
        result = run.result()  # raises WorkflowFailed / ExecutionInterrupted, rendered cleanly
        self.shell.user_ns.update(run.outputs)
        return result

    def _show(self, run: Run, quiet: bool = False) -> Any:
        """Remember the run and display its live view (from the main thread); returns the view."""
        self.runs[run.key] = run
        view = make_view(run, quiet=quiet)
        if view is not None:
            display(view)
            view.start()
        return view

    def _export_later(self, run: Run) -> None:
        """Set the run's names in the notebook when it completes (for runs nobody waits for)."""

        def export() -> None:
            run.wait()
            if run.status == "completed":
                self.shell.user_ns.update(run.outputs)

        threading.Thread(target=export, daemon=True).start()

    # -- %durable_status / %durable_resume / %durable_cancel -----------------------------------

    @magic_arguments()
    @argument("name", nargs="?", help="A workflow name or execution id: show its calls and traceback.")
    @argument("--all", action="store_true", help="Every execution, not only the latest of each name.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @line_magic
    def durable_status(self, line: str) -> Any:
        """List the executions in the store, or show one in detail."""
        args = parse_argstring(self.durable_status, line)
        return status_report(self.engine(args.db).store, args.name, show_all=args.all)

    @magic_arguments()
    @argument("name", nargs="?", help="A workflow name or execution id.")
    @argument("--all", action="store_true", help="Resume every unfinished execution of the store.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @argument("--executor", choices=EXECUTOR_NAMES, help="Where the notebook functions run (default: threads).")
    @argument("--workers", type=int, help="Threads for the notebook functions.")
    @argument("--background", action="store_true", help="Return at once; names are set when it completes.")
    @argument("--quiet", action="store_true", help="No progress view.")
    @line_magic
    def durable_resume(self, line: str) -> Any:
        """Continue unfinished executions where they stopped, with the functions defined now."""
        args = parse_argstring(self.durable_resume, line)
        engine = self.engine(args.db)
        if args.all == bool(args.name):
            raise DurableError("give a workflow name or id, or --all")
        executor = self.backend(args.executor, args.workers)
        if args.name:
            run = engine.resume(args.name, self.shell.user_ns, executor=executor)
            return self._follow(run, background=args.background, quiet=args.quiet)
        rows = engine.store.unfinished_executions()
        if not rows:
            print(f"nothing to resume in {engine.url}")
            return None
        runs = [engine.resume(row.id, self.shell.user_ns, executor=executor) for row in rows]
        for run in runs:
            self._show(run, args.quiet)
        if args.background:
            for run in runs:
                self._export_later(run)
            return None
        _wait_all(runs, "stopped waiting; the executions can be resumed again")
        for run in runs:
            if run.status == "completed":
                self.shell.user_ns.update(run.outputs)
        failed = [run for run in runs if run.status != "completed"]
        if failed:
            raise failed[0].error or DurableError(summary(failed[0]))
        return None

    @magic_arguments()
    @argument("name", help="A workflow name or execution id running in this kernel.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @line_magic
    def durable_cancel(self, line: str) -> None:
        """Interrupt a workflow running in this kernel (running calls finish; it can be resumed)."""
        args = parse_argstring(self.durable_cancel, line)
        if not self.engine(args.db).cancel(args.name):
            raise DurableError(f"{args.name!r} is not running in this kernel")
        print(f"interrupting {args.name!r}: running calls finish and are kept; resume with %durable_resume")

    # -- after %load_ext ----------------------------------------------------------------------

    def announce_unfinished(self) -> None:
        """List executions a dead kernel left unfinished, with Resume buttons in Jupyter."""
        url = self.store_url()
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
            return  # never create a store just by loading the extension
        try:
            from sqlalchemy import create_engine

            probe = create_engine(url)
            known = read_revision(probe) is not None
            probe.dispose()
            rows = self.engine().store.unfinished_executions() if known else []
        except Exception:
            return
        if not rows:
            return
        if widgets_available():
            self.resume_panel = self._resume_panel(rows)
            display(self.resume_panel)
        else:
            lines = "\n".join(f"  {item}" for item in unfinished_summary(rows))
            print(
                f"durable-monty-nb: unfinished executions in {self.engine().url}:\n{lines}\n"
                f"Run their cells again, or %durable_resume NAME (or --all), once their functions are defined."
            )

    def _resume_panel(self, rows: list[Any]) -> Any:
        import ipywidgets as widgets

        items: list[Any] = [
            widgets.HTML(
                f"<b>Unfinished durable executions</b> in {self.engine().url}: run "
                f"the cells that define their functions, then resume."
            )
        ]
        for row, text in zip(rows, unfinished_summary(rows), strict=True):
            button = widgets.Button(description="Resume", tooltip=f"%durable_resume {row.id}", icon="play")
            out = widgets.Output()

            def resume(_: Any, execution_id: str = row.id, out: Any = out, button: Any = button) -> None:
                out.clear_output()
                with out:
                    try:
                        run = self.engine().resume(execution_id, self.shell.user_ns, executor=self.backend(None))
                    except DurableError as exc:
                        print(f"{type(exc).__name__}: {exc}")
                        return
                    button.disabled = True
                    self._show(run)
                    self._export_later(run)

            button.on_click(resume)
            items.append(widgets.VBox([widgets.HBox([button, widgets.Label(text)]), out]))

        class ResumePanel(widgets.VBox):
            def __repr__(self) -> str:  # a stable text/plain fallback
                return "unfinished durable executions:\n" + "\n".join(unfinished_summary(rows))

        return ResumePanel(items)


def _wait_all(runs: list[Run], interrupted: str) -> None:
    """Wait for the runs; Ctrl-C interrupts them (they stay resumable) and raises ExecutionInterrupted."""
    try:
        for run in runs:
            while not run.wait(0.1):
                pass
    except KeyboardInterrupt:
        for run in runs:
            run.cancel()
        raise ExecutionInterrupted(interrupted) from None


class HeldPrinter:
    """Prints of the workflow: held until released, then written to the cell's stdout/stderr."""

    def __init__(self) -> None:
        self._held: list[tuple[str, str]] | None = []
        self._lock = threading.Lock()

    def __call__(self, stream: str, text: str) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append((stream, text))
                return
        default_printer(stream, text)

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held or [], None
        for stream, text in held:
            default_printer(stream, text)


_MAGICS: dict[int, DurableMagics] = {}


def load_extension(ipython: Any) -> None:
    if id(ipython) in _MAGICS:
        return
    magics = DurableMagics(shell=ipython)
    ipython.register_magics(magics)
    ipython.configurables.append(magics)
    _MAGICS[id(ipython)] = magics
    magics.announce_unfinished()


def unload_extension(ipython: Any) -> None:
    magics = _MAGICS.pop(id(ipython), None)
    if magics is not None and magics in ipython.configurables:
        ipython.configurables.remove(magics)
