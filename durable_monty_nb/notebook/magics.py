"""IPython magics: ``%%durable``, ``%durable_status``, ``%durable_resume``, ``%durable_cancel``
(``%durable_why`` is in :mod:`.why_magics`).

A thin face over :class:`~durable_monty_nb.Engine`: it picks the store, passes the notebook's
namespace, shows a view and exports the workflow's names when it completes.

Store selection, first found: ``--db URL``; ``%config DurableMagics.db_url = ...`` (or
``c.DurableMagics.db_url`` in ipython_config.py); the ``DURABLE_MONTY_DB`` environment variable;
the default store of the notebook's folder: ``durable_monty.db`` there if it exists (stores of
earlier releases), else ``.durable/durable_monty.db`` (a hidden folder).

Workflow names are scoped by notebook (see :mod:`.scope`): ``%%durable train`` in two notebooks
of one folder are two workflows.

Executor selection: ``--executor NAME``, else ``%config DurableMagics.executor``: any executor of
the registry (``threads``, ``rq``, ``dask``, or one registered by a package). Each setting an
executor takes is read from ``%config DurableMagics.executor_settings = {NAME: {setting: value}}``,
else from the option ``NAME_SETTING`` when there is one: RQ reads ``rq_url`` and ``rq_queue``, Dask
``dask_address`` (none: a local cluster of this kernel); ``workers`` is ``--workers`` or ``workers``.
"""

from __future__ import annotations

import contextlib
import html
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Dict, Enum, Float, Int, TraitError, Unicode, observe, validate

from .. import defaults
from ..engine import warming
from ..engine.analysis import code_hash
from ..engine.controls import CallControls
from ..engine.driver import default_printer, stored_call_views
from ..engine.driver.switching import check_switch_interval, set_switch_interval
from ..engine.engine import Engine
from ..engine.options import RunOptions, add_arguments, check_workers, options_from_arguments
from ..engine.run import Run, calls_frame
from ..errors import DurableError, ExecutionInterrupted, NotCancellable, StoreUnavailable
from ..executors import Backend, executor_entry
from ..store.retention import parse_age
from ..store.schema import read_revision
from ..store.store import Store, default_db_path, lease_held, normalize_url
from .retention_magics import RetentionMagics
from .scope import (
    current_source,
    display_name,
    headless_cell_id,
    is_cell_id,
    notebook_file,
    notebook_label,
    notebook_told,
    scoped_key,
    split_key,
)
from .signal_magics import SignalMagics
from .status import outage_report, status_report, unfinished_summary
from .tracebacks import relabel, relabel_error
from .views import make_view, summary, widgets_available
from .why_magics import WhyMagics

F = TypeVar("F", bound=Callable[..., Any])


def run_arguments(*names: str) -> Callable[[F], F]:
    """The magic's arguments of the run options ``names``, as declared once in
    :data:`~..engine.options.ARGUMENTS` (in this order)."""
    decorators: list[Any] = []
    add_arguments(lambda flag, **kwargs: decorators.append(argument(flag, **kwargs)), names)

    def decorate(fn: F) -> F:
        for decorator in reversed(decorators):  # IPython lists a magic's arguments bottom-up
            fn = decorator(fn)
        return fn

    return decorate


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
    executor = Unicode(defaults.EXECUTOR, help="Where notebook functions run: a registered executor's name.").tag(
        config=True
    )
    executor_settings = Dict(
        help="Settings of executors by name, e.g. {'rq': {'url': 'redis://host:6379/0'}} (over rq_url ...)."
    ).tag(config=True)
    rq_url = Unicode(None, allow_none=True, help="Redis URL of the rq executor (default: the local server).").tag(
        config=True
    )
    timeout = Float(None, allow_none=True, help="Seconds a call may run (functions without @limits).").tag(config=True)
    concurrency = Int(None, allow_none=True, help="Most calls of one function at once (without @limits).").tag(
        config=True
    )
    rate = Unicode(None, allow_none=True, help="Most call starts of one function, e.g. '10/s' (without @limits).").tag(
        config=True
    )
    durability = Enum(
        defaults.DURABILITY_LEVELS, default_value=defaults.DURABILITY, help="full (survives a power cut) or process."
    ).tag(config=True)
    store_outage_limit = Float(
        defaults.STORE_OUTAGE_LIMIT, help="Seconds a run waits for an unreachable store before it stops."
    ).tag(config=True)
    rq_queue = Unicode(defaults.RQ_QUEUE, help="RQ queue of the rq executor.").tag(config=True)
    dask_address = Unicode(
        None, allow_none=True, help="Dask scheduler address of the dask executor (none: a local cluster)."
    ).tag(config=True)
    switch_interval = Float(
        defaults.SWITCH_INTERVAL,
        allow_none=True,
        help="Seconds between forced thread switches while workflows run beside a busy thread (None: Python's).",
    ).tag(config=True)

    retention = Unicode(
        defaults.RETENTION,
        allow_none=True,
        help="Prune completed executions older than this ('30d', '12h'; None: off), the latest of each kept.",
    ).tag(config=True)

    @validate("retention")
    def _retention(self, proposal: Any) -> str | None:
        try:
            parse_age(proposal["value"])
        except ValueError as exc:
            raise TraitError(f"DurableMagics.retention: {exc}") from None
        return proposal["value"]

    @observe("retention")
    def _apply_retention(self, change: Any) -> None:
        if not hasattr(self, "_engines"):  # set by the configuration, before __init__ made any engine
            return
        with self._lock:
            for engine in self._engines.values():
                engine.retention = change["new"]

    @validate("workers", "lease_ttl")
    def _positive(self, proposal: Any) -> int:
        if proposal["value"] < 1:
            raise TraitError(f"DurableMagics.{proposal['trait'].name} must be at least 1, not {proposal['value']}")
        return proposal["value"]

    @validate("timeout", "concurrency", "rate")
    def _call_limit(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value is not None:
            try:
                CallControls.of(**{proposal["trait"].name: value})
            except ValueError as exc:
                raise TraitError(f"DurableMagics.{proposal['trait'].name}: {exc}") from None
        return value

    @validate("executor")
    def _known_executor(self, proposal: Any) -> str:
        try:
            executor_entry(proposal["value"])
        except ValueError as exc:
            raise TraitError(f"DurableMagics.executor: {exc}") from None
        return proposal["value"]

    @validate("store_outage_limit")
    def _positive_seconds(self, proposal: Any) -> float:
        if not proposal["value"] > 0:
            raise TraitError(
                f"DurableMagics.store_outage_limit must be a positive number of seconds, not {proposal['value']}"
            )
        return proposal["value"]

    @validate("rq_queue")
    def _queue_name(self, proposal: Any) -> str:
        if not proposal["value"].strip():
            raise TraitError("DurableMagics.rq_queue must name a queue")
        return proposal["value"]

    @validate("switch_interval")
    def _switch_interval(self, proposal: Any) -> float | None:
        try:
            check_switch_interval(proposal["value"])
        except ValueError as exc:
            raise TraitError(f"DurableMagics.switch_interval: {exc}") from None
        return proposal["value"]

    @observe("switch_interval")
    def _apply_switch_interval(self, change: Any) -> None:
        set_switch_interval(change["new"])

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        set_switch_interval(self.switch_interval)
        self._engines: dict[tuple[str, str], Engine] = {}
        self._lock = threading.Lock()
        self.runs: dict[str, Run] = {}
        self.views: dict[str, Any] = {}  # the latest view of each run, by key
        self.resume_panel: Any = None  # the panel of unfinished executions shown by %load_ext
        self._banner_items: dict[str, Any] = {}  # its rows, by key: gone once a run of the key completes
        self._banner_resumed: set[str] = set()  # keys resumed with the panel's buttons (their widgets stay)

    # -- stores -----------------------------------------------------------------------------

    def store_url(self, option: str | None = None) -> str:
        return normalize_url(option or self.db_url or os.environ.get(DB_ENV) or default_db_path(self.folder()))

    def folder(self) -> Path:
        """The notebook's folder (the working directory when the kernel does not know its notebook)."""
        notebook = notebook_file(self.shell)
        return notebook.parent if notebook is not None else Path.cwd()

    # -- names per notebook ---------------------------------------------------------------------

    def notebook(self, store: Store) -> str | None:
        """How this kernel's notebook is named in the keys of ``store`` (None: no notebook)."""
        notebook = notebook_file(self.shell)
        return notebook_label(notebook, store.url) if notebook is not None else None

    def workflow_key(self, store: Store, name: str, cell: str) -> str:
        """The store key of workflow ``name`` of this notebook.

        A store written before keys were scoped by notebook has the plain name: the notebook
        takes that workflow over when it is the same one (the same cell id or code-derived
        name, or the same code under this name) and nobody drives it right now.
        """
        key = scoped_key(self.notebook(store), name)
        if key == name or store.latest_execution(key) is not None:
            return key
        legacy = store.latest_execution(name)
        if legacy is None or lease_held(legacy):
            return key
        if name.startswith(("cell-", "code-")) or legacy.code_hash == code_hash(cell):
            store.rename_key(name, key)
        return key

    def own_unfinished(self, store: Store) -> list[Any]:
        """Unfinished executions of this notebook and those without a notebook (all in a terminal)."""
        notebook = self.notebook(store)
        rows = store.unfinished_executions()
        if notebook is None:
            return rows
        return [row for row in rows if split_key(row.key)[0] in (None, notebook)]

    def engine(self, option: str | None = None, durability: str | None = None) -> Engine:
        """The engine of a store (one per store and durability level)."""
        url = self.store_url(option)
        durability = durability or self.durability
        with self._lock:
            if (url, durability) not in self._engines:
                self._engines[(url, durability)] = Engine(
                    url,
                    workers=self.workers,
                    lease_ttl=float(self.lease_ttl),
                    store_outage_limit=float(self.store_outage_limit),
                    durability=durability,
                    retention=self.retention,
                )
            return self._engines[(url, durability)]

    # -- %%durable --------------------------------------------------------------------------

    @magic_arguments()
    @argument("name", nargs="?", help="Name of the workflow (its key in the store). Default: from the cell.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @run_arguments("executor", "workers")
    @argument("--background", action="store_true", help="Return at once; names are set when it completes.")
    @argument(
        "--detach",
        action="store_true",
        help="Hand the run to a runner (durable-monty-nb runner): it goes on without this kernel; "
        "run the cell again in any kernel to watch it or get its result.",
    )
    @argument("--rerun", action="store_true", help="Start fresh: run every call again.")
    @argument(
        "--rerun-fn",
        action="append",
        default=[],
        metavar="NAME",
        help="Run the calls of this function again (repeat for several); the others are reused as usual.",
    )
    @run_arguments("retries", "backoff", "delay", "max_delay", "timeout", "concurrency", "rate")
    @argument(
        "--durability",
        choices=defaults.DURABILITY_LEVELS,
        help="full: every step on disk (survives a power cut); process: survives a kernel crash, faster.",
    )
    @argument("--quiet", action="store_true", help="No progress view.")
    @cell_magic
    def durable(self, line: str, cell: str) -> Any:
        """Run the cell durably: calls to notebook functions run in threads, every result is stored,
        and the cell picks up where it stopped after a kernel restart.

        The last expression is the cell's result; names the cell assigns at top level are set in
        the notebook when it completes.
        """
        warming.run_began()
        args = parse_argstring(self.durable, line)
        if not cell.strip():
            raise DurableError("the %%durable cell is empty: write the workflow code below the magic line")
        check_options(args)
        options = self.run_options(args)
        engine = self.engine(args.db, args.durability)
        name = args.name or self._cell_key(cell) or f"code-{code_hash(cell)[:12]}"
        key = self.workflow_key(engine.store, name, cell)
        if args.detach:
            if args.rerun_fn:
                raise DurableError("--rerun-fn does not go with --detach. Nothing ran.")
            run = engine.start(cell, self.shell.user_ns, key=key, rerun=args.rerun, options=options, detach=True)
            # Completed: the stored result and names, as any cell. Else the widget watches the store.
            return self._follow(run, background=not run.done, quiet=args.quiet)
        printer = HeldPrinter()  # prints made while the run starts appear below its view, in order
        try:
            run = engine.start(
                cell,
                self.shell.user_ns,
                key=key,
                rerun=args.rerun,
                rerun_functions=args.rerun_fn,
                options=options,
                print_callback=printer,
                paused=True,
            )
        except BaseException:
            printer.release()
            raise
        return self._follow(
            run,
            background=args.background,
            quiet=args.quiet,
            printer=printer,
            on_retry=self._retrier(engine, options),
        )

    def run_options(self, args: Any, *, limits: bool = True) -> RunOptions:
        """The run options of a cell: its own, else ``%config`` (with ``limits``: timeout,
        concurrency, rate), checked by RunOptions before anything runs."""
        fallback = {name: getattr(self, name) for name in ("timeout", "concurrency", "rate")} if limits else {}
        try:
            options = options_from_arguments(args, fallback)
        except (ValueError, TypeError) as exc:
            raise DurableError(f"{exc}. Nothing ran.") from None
        return replace(options, executor=self.backend(options.executor, options.workers), workers=None)

    def backend(self, name: str | None, workers: int | None = None) -> Backend:
        """The executor backend of a cell: ``--executor``, else ``%config DurableMagics.executor``."""
        if workers is not None:
            try:
                check_workers(workers)
            except ValueError as exc:
                raise DurableError(f"{exc}. Nothing ran.") from None
        name = name or self.executor
        try:
            entry = executor_entry(name)
        except ValueError as exc:
            raise DurableError(f"{exc}. Nothing ran.") from None
        settings: dict[str, Any] = {"workers": workers or self.workers}
        for setting in entry.settings:  # the option NAME_SETTING (rq_url, dask_address ...), if there is one
            option = f"{name}_{setting}"
            if self.has_trait(option):
                settings[setting] = getattr(self, option)
        settings.update(self.executor_settings.get(name) or {})
        return entry.create(settings)

    def _cell_key(self, cell: str) -> str | None:
        """Without a name: the notebook cell's id (stable across edits), else derived from the code."""
        kernel = getattr(self.shell, "kernel", None)
        try:
            cell_id = kernel.get_parent()["metadata"].get("cellId") if kernel is not None else None
        except Exception:
            cell_id = None
        if cell_id and not is_cell_id(str(cell_id)):
            cell_id = None  # a frontend's own name for the cell (VS Code's URI): the file's id instead
        if not cell_id and kernel is not None and notebook_file(self.shell) is not None:
            cell_id = headless_cell_id(self.shell, current_source(self.shell))  # as JupyterLab tells it
        return f"cell-{cell_id[:12]}" if cell_id else None

    def _follow(
        self,
        run: Run,
        *,
        background: bool,
        quiet: bool,
        printer: HeldPrinter | None = None,
        on_retry: Any = None,
    ) -> Any:
        """Show the run; wait for it (unless in the background); export its names.

        In the foreground the cell raises a failure itself, so the view shows it in one line
        (the traceback appears once, as the cell's error); in the background the view shows it.
        """
        # A headless client (nbconvert, papermill, nbval) keeps what a display first said and
        # nbval ignores display updates: there the widget is displayed when the cell ends, with
        # its final status line. A frontend that renders it (JupyterLab, VS Code) gets it at once.
        deferred = not background and widgets_available() and not notebook_told(self.shell)
        view = self._show(run, quiet, background=background, on_retry=on_retry, defer=deferred)
        if printer is not None:
            printer.release()
        run.begin()
        if background:
            self._export_later(run)
            return None
        name = display_name(run.key)
        try:
            _wait_all(
                [run],
                f"stopped waiting for {name!r}. Calls already running finish in the background and their "
                f"results are kept; nothing is lost. Continue with: %durable_resume {name}",
            )
        finally:
            if deferred and view is not None:
                if run.done:
                    view.join(5)
                self._display(view)
        if not run.done:  # parked on a signal: it goes on in the background, names are set when it completes
            if view is not None:
                view.refresh()  # shows what it waits for (and how to deliver) before the cell returns
            self._export_later(run)
            return None
        if view is not None and not deferred:
            view.join(5)
            finish_display(view)
        try:
            result = run.result()  # raises WorkflowFailed / ExecutionInterrupted, rendered cleanly
        except DurableError as exc:
            if run.status == "failed" and not deferred and hasattr(view, "capture_error"):
                msg_id = _request_id(self.shell)
                if msg_id:  # the traceback goes into the widget, which Retry failed clears
                    view.capture_error(msg_id)
            raise relabel_error(exc, self.shell) from None
        self.shell.user_ns.update(run.outputs)
        self._completed(run)
        return result

    def _show(
        self,
        run: Run,
        quiet: bool = False,
        *,
        background: bool = True,
        on_retry: Any = None,
        show_error: bool | None = None,
        defer: bool = False,
    ) -> Any:
        """Remember the run and display its live view (from the main thread); returns the view.

        ``background``: the cell does not wait for the run, so the view shows its traceback
        (unless ``show_error`` says otherwise) and a Cancel button (a click reaches the kernel
        only when no cell is running). ``defer``: the caller displays it (``_display``).
        """
        self.runs[run.key] = run
        earlier = self.views.get(run.key)
        left = earlier is not None and earlier.run is not run and earlier.run.done
        if left and hasattr(earlier, "rebind") and earlier.run.status != "completed":
            # the widget a failed or interrupted run left follows the run that continues it
            earlier.rebind(run, f"continued by a new run of {display_name(run.key)}, shown below")
        view = make_view(
            run,
            quiet=quiet,
            show_error=background if show_error is None else show_error,
            cancellable=background,
            on_retry=on_retry,
        )
        if view is not None:
            self.views[run.key] = view
            if not defer:
                self._display(view)
            view.start()
        return view

    def _display(self, view: Any) -> None:
        if widgets_available():  # updated with the final status line when the run ends (finish_display)
            view.display_handle = display(view, display_id=True)
        else:
            display(view)

    def _retrier(self, engine: Engine, options: RunOptions) -> Any:
        """What a view's Retry failed button does: resume the failed execution, as running the cell
        again does (only its failed and remaining calls run), in the background, with the cell's
        executor, retry policy and call limits."""

        def retry_failed(run: Run) -> Run:
            again = engine.resume(run.execution_id, self.shell.user_ns, options=options)
            self.runs[again.key] = again  # the widget that asked follows it (RunWidget.rebind)
            self._export_later(again)
            return again

        return retry_failed

    def _completed(self, run: Run) -> None:
        """A run completed: its row leaves the %load_ext panel (the panel goes when it is empty).

        A row resumed with its own button keeps the run's widget (it says the run completed) and
        loses its button; the panel's heading then says what it holds."""
        item = self._banner_items.pop(run.key, None)
        panel = self.resume_panel
        if item is None or panel is None:
            return
        resumed = run.key in self._banner_resumed
        if resumed:
            item.children[0].layout.display = "none"  # the Resume button and the unfinished line
        else:
            panel.children = tuple(child for child in panel.children if child is not item)
        if not self._banner_items:
            if self._banner_resumed:
                panel.children[0].value = f"<b>Resumed durable executions</b> in {html.escape(self.engine().url)}:"
            else:
                panel.layout.display = "none"

    def _export_later(self, run: Run) -> None:
        """Set the run's names in the notebook when it completes (for runs nobody waits for)."""

        def export() -> None:
            run.wait()
            if run.status == "completed":
                self.shell.user_ns.update(run.outputs)
                self._completed(run)
            view = self.views.get(run.key)
            if view is not None and view.run is run:
                view.join(5)
                finish_display(view)

        threading.Thread(target=export, daemon=True).start()

    # -- %durable_status / %durable_resume / %durable_cancel -----------------------------------

    @magic_arguments()
    @argument("name", nargs="?", help="A workflow name or execution id: show its calls and traceback.")
    @argument("--all", action="store_true", help="Every execution, not only the latest of each name.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @argument("--df", action="store_true", help="With a name: the calls as a pandas DataFrame.")
    @line_magic
    def durable_status(self, line: str) -> Any:
        """List the executions in the store, or show one in detail (``--df``: its calls as a DataFrame)."""
        args = parse_argstring(self.durable_status, line)
        engine = self.engine(args.db)
        store = engine.store
        if args.df and not args.name:
            raise DurableError("--df needs a workflow name or id: %durable_status NAME --df")
        live = {run.execution_id: run.progress for run in engine.active_runs()}  # what the code tells of its total
        try:
            if not args.name:
                return status_report(store, show_all=args.all, live=live)
            row = store.find_execution(args.name, notebook=self.notebook(store))
            if args.df:
                return calls_frame(stored_call_views(store.load_calls(row.id)))
            return status_report(store, row.id, relabel=lambda text: relabel(text, self.shell), live=live)
        except StoreUnavailable as exc:  # the outage, and what this kernel's runs know without the store
            if args.df:
                raise
            return outage_report(exc, engine.active_runs(), store.display_url)

    @magic_arguments()
    @argument("name", nargs="?", help="A workflow name or execution id.")
    @argument("--all", action="store_true", help="Resume every unfinished execution of the store.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @run_arguments("executor", "workers")
    @argument("--background", action="store_true", help="Return at once; names are set when it completes.")
    @argument("--quiet", action="store_true", help="No progress view.")
    @line_magic
    def durable_resume(self, line: str) -> Any:
        """Continue unfinished executions where they stopped, with the functions defined now."""
        warming.run_began()
        args = parse_argstring(self.durable_resume, line)
        if args.all == bool(args.name):
            raise DurableError("give a workflow name or id, or --all")
        options = self.run_options(args, limits=False)
        engine = self.engine(args.db)
        retrier = self._retrier(engine, options)
        if args.name:
            row = engine.store.find_execution(args.name, notebook=self.notebook(engine.store))
            run = engine.resume(row.id, self.shell.user_ns, options=options)
            return self._follow(run, background=args.background, quiet=args.quiet, on_retry=retrier)
        rows = self.own_unfinished(engine.store)
        if not rows:
            print(f"nothing to resume in {engine.url}")
            return None
        runs = [engine.resume(row.id, self.shell.user_ns, options=options) for row in rows]
        for run in runs:  # several runs: each view shows its own failure, the cell names them
            self._show(run, args.quiet, background=args.background, on_retry=retrier, show_error=len(runs) > 1)
        if args.background:
            for run in runs:
                self._export_later(run)
            return None
        _wait_all(runs, "stopped waiting; the executions can be resumed again")
        for run in runs:
            if run.done and (view := self.views.get(run.key)) is not None:
                view.join(5)
                finish_display(view)
            if run.status == "completed":
                self.shell.user_ns.update(run.outputs)
                self._completed(run)
            elif not run.done:  # parked on a signal
                self._export_later(run)
        failed = [run for run in runs if run.done and run.status != "completed"]
        if len(runs) == 1 and failed:
            raise relabel_error(failed[0].error or DurableError(summary(failed[0])), self.shell)
        if failed:
            listed = "; ".join(summary(run) for run in failed)
            raise DurableError(f"{len(failed)} of {len(runs)} resumed executions did not complete: {listed}")
        return None

    @magic_arguments()
    @argument("name", help="A workflow name or execution id running in this kernel, or a detached one.")
    @argument("--db", help="Store: SQLAlchemy URL or SQLite file path.")
    @line_magic
    def durable_cancel(self, line: str) -> None:
        """Interrupt a workflow running in this kernel, or a detached one from any kernel (its
        runner stops it); running calls finish, it can be resumed."""
        args = parse_argstring(self.durable_cancel, line)
        engine = self.engine(args.db)
        row = engine.store.find_execution(args.name, notebook=self.notebook(engine.store))
        if not engine.cancel(row.id):
            raise NotCancellable(f"{args.name!r} is not running in this kernel, and no runner drives it")
        print(f"interrupting {args.name!r}: running calls finish and are kept; resume with %durable_resume")

    # -- after %load_ext ----------------------------------------------------------------------

    def announce_unfinished(self) -> None:
        """List executions a dead kernel left unfinished, with Resume buttons in Jupyter."""
        url = self.store_url()
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
            # Never create a store just by loading the extension; but import its SQL dialect, which
            # the first %%durable cell would otherwise wait for (about 50 ms).
            import sqlalchemy.dialects.sqlite.pysqlite  # noqa: F401

            return
        try:
            from sqlalchemy import create_engine

            probe = create_engine(url)
            known = read_revision(probe) is not None
            probe.dispose()
            rows = self.own_unfinished(self.engine().store) if known else []
        except Exception:
            return
        rows = [row for row in rows if worth_resuming(row)]
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
                    self._banner_resumed.add(run.key)
                    self._show(run, on_retry=self._retrier(self.engine(), RunOptions(executor=self.backend(None))))
                    self._export_later(run)

            button.on_click(resume)
            item = widgets.VBox([widgets.HBox([button, widgets.Label(text)]), out])
            self._banner_items[row.key] = item
            items.append(item)

        class ResumePanel(widgets.VBox):
            def __repr__(self) -> str:  # a stable text/plain fallback
                return "unfinished durable executions:\n" + "\n".join(unfinished_summary(rows))

        return ResumePanel(items)


NAME_LIMIT = 200


def worth_resuming(row: Any) -> bool:
    """Whether %load_ext offers an unfinished execution for Resume: not a run its own code failed
    (a typo, a method of a handle: it fails again the same way until the cell is edited, which
    starts a new execution); a failed call, once its function is fixed, is worth it."""
    return row.status != "failed" or (row.calls_failed or 0) > 0


def check_options(args: Any) -> None:
    """Refuse a workflow name out of range with one clear error, before anything runs (the run
    options are checked by RunOptions, see :meth:`DurableMagics.run_options`)."""
    problems = []
    name = getattr(args, "name", None)
    if name is not None and ("::" in name or len(name) > NAME_LIMIT):
        problems.append(f"a workflow name has at most {NAME_LIMIT} characters and no '::', not {name[:60]!r}")
    if problems:
        raise DurableError("; ".join(problems) + ". Nothing ran.")


def finish_display(view: Any) -> None:
    """Give a widget's output its final plain-text form (its status line, for headless outputs)."""
    handle = getattr(view, "display_handle", None)
    if handle is not None:
        with contextlib.suppress(Exception):  # the frontend is gone: nothing to update
            handle.update(view)


def _request_id(shell: Any) -> str | None:
    """The msg_id of the execute request the kernel is handling (None outside a kernel)."""
    try:
        return str(shell.kernel.get_parent()["header"]["msg_id"]) or None
    except (AttributeError, KeyError, TypeError):
        return None


def _wait_all(runs: list[Run], interrupted: str) -> None:
    """Wait for the runs; Ctrl-C interrupts them (they stay resumable) and raises ExecutionInterrupted."""
    try:
        for run in runs:
            while not run.wait(0.1):
                if run.parked:  # waits only for signals: free the kernel for the buttons and %durable_signal
                    break
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
    ipython.register_magics(SignalMagics(ipython, magics))  # %durable_signal, %durable_serve
    ipython.register_magics(WhyMagics(ipython, magics))  # %durable_why
    ipython.register_magics(RetentionMagics(ipython, magics))  # %durable_forget, %durable_prune
    ipython.configurables.append(magics)
    _MAGICS[id(ipython)] = magics
    warming.warm_up()  # the first %%durable cell finds Monty started and a run's code warm
    magics.announce_unfinished()


def unload_extension(ipython: Any) -> None:
    magics = _MAGICS.pop(id(ipython), None)
    if magics is not None and magics in ipython.configurables:
        ipython.configurables.remove(magics)
