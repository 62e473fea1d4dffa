"""The engine: run workflow code durably against a store, from any Python program.

```python
from durable_monty_nb import Engine

engine = Engine("runs.db")
total = engine.run(code, namespace={"process": process, "items": items}, key="demo")
```

Deciding what a run of a key means:

- the latest execution of the key completed with the same code, the same values of the names
  the code reads and the same function definitions: its stored result, nothing runs;
- it is unfinished (crashed, interrupted, failed), the code is unchanged and so is everything
  it reads (the values of the names the code reads, the fingerprints of its functions): it
  resumes from its latest checkpoint, calls with committed results are not run again;
- otherwise a new execution starts, and each call of it that an earlier execution of the key
  completed (the same function fingerprint, the same arguments) is served from the store. An
  unfinished execution whose inputs changed is not resumed: its snapshot holds the old values.

A function's fingerprint covers its code, the notebook functions it reaches and the content of
the globals, closure and default values it reads (see :mod:`.fingerprint`). ``rerun_functions``
names functions whose calls run again whatever the store holds; ``run.explain()`` says, for
each call, where it came from or why it ran again (see :mod:`.why`).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from pydantic_monty import MontyError, MontyRuntimeError, MontySyntaxError

from .. import defaults
from ..errors import (
    DurableError,
    ExecutionBusy,
    MissingFunctionsError,
    WorkflowCodeError,
    WorkflowFailed,
)
from ..executors import Backend, RunContext, backend
from ..store.owners import describe_owner, lease_held, new_owner, release_owner
from ..store.retention import Removal, StoreSize, parse_age
from ..store.signing import secret_argument
from ..store.store import UNFINISHED, Store
from ..values import ValueCodec
from . import sandbox
from .analysis import CodeInfo, analyze
from .controls import CallControls, Rate
from .driver import Driver, Settings, default_printer, format_monty_error, stored_call_views
from .events import ExecutionStarted, Printed
from .fingerprint import Fingerprinter
from .inputs import (  # noqa: F401  (where they were before inputs.py)
    _describe_unfinished,
    _same_fingerprints,
    _same_reads,
    check_names,
    close_names,
    execution_values,
    prepare_inputs,
    ship_functions,
)
from .options import RunOptions, check_workers
from .retry import RetryPolicy
from .run import CallView, Progress, Run
from .why import explain

PrintCallback = Callable[[str, str], None]
COMPLETED_KEPT = 8  # completed runs a process keeps for %durable_resume to show what they did


class Engine:
    """Runs workflow code durably against one store.

    ``db`` is a SQLAlchemy URL or a SQLite file path (default ``.durable/durable_monty.db`` in the
    working directory, or ``durable_monty.db`` there if it exists). ``executor`` is where notebook
    functions run: the name of a registered executor (``"threads"``, the default, ``"rq"``, ``"dask"``,
    or one of :func:`~durable_monty_nb.executors.register_executor`), or a backend such as
    ``RQ(url, queue)`` or ``Dask(address)`` (see :mod:`durable_monty_nb.executors`). ``workers``
    sizes the thread pool of each execution, ``retry`` is the policy of functions without their
    own, ``secret`` the signing secret (see :mod:`durable_monty_nb.store.signing`; ``key=``, its old
    name, still works with a DeprecationWarning: ``key`` names a workflow), ``lease_ttl`` how
    long (seconds) a silent owner keeps an execution before another process may take it over.
    ``timeout`` (seconds), ``concurrency`` and ``rate`` (``"10/s"``, ``"100/min"``) are the call
    controls of functions without their own (see :func:`durable_monty_nb.limits`).
    ``store_outage_limit``: seconds a run rides out an unreachable store (its results kept in
    memory) before it stops as interrupted. ``durability``: ``"full"`` (default) or ``"process"``
    (see :data:`durable_monty_nb.defaults.DURABILITY`). ``retention`` (``"30d"``, seconds;
    default None: off): completed executions older than that are pruned in the background, the
    latest of each key kept, with the first run and then at most hourly (see :meth:`prune`).
    """

    def __init__(
        self,
        db: str | None = None,
        *,
        executor: str | Backend | None = None,
        workers: int = defaults.WORKERS,
        retry: RetryPolicy | None = None,
        secret: bytes | str | None = None,
        lease_ttl: float = defaults.LEASE_TTL,
        timeout: float | None = None,
        concurrency: int | None = None,
        rate: str | Rate | None = None,
        store_outage_limit: float = defaults.STORE_OUTAGE_LIMIT,
        durability: str = defaults.DURABILITY,
        key: bytes | str | None = None,
        retention: float | str | None = defaults.RETENTION,
    ) -> None:
        secret = secret_argument(secret, key, "Engine")
        check_workers(workers)
        controls = CallControls.of(timeout, concurrency, rate)  # before the store: bad values change nothing
        self.retention = retention
        self._retained_at: float | None = None
        self.retention_error: BaseException | None = None
        self.store = Store(db, secret=secret, durability=durability)
        self.settings = Settings(
            workers=workers,
            retry=retry or RetryPolicy(),
            lease_ttl=lease_ttl,
            controls=controls,
            store_outage_limit=store_outage_limit,
        )
        self.executor = backend(executor, workers=workers)
        self._active: dict[str, Driver] = {}
        self._completed: dict[str, Run] = {}  # the last runs this process drove to completion, by id
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.store.display_url

    @property
    def retention(self) -> float | None:
        return self._retention

    @retention.setter
    def retention(self, value: float | str | None) -> None:
        self._retention = parse_age(value)

    # -- keeping the store small --------------------------------------------------------------

    def forget(self, name_or_id: str, *, force: bool = False, vacuum: bool = False) -> Removal:
        """Remove a workflow (every execution of a key) or one execution (an id), with its calls,
        checkpoints, attempts, signals and the stored values and shipped functions nothing else uses.

        Raises ForgetRefused, changing nothing, for an execution a live process drives (running or
        parked) unless ``force``; a run of this engine is then interrupted first.
        """
        if force:
            for run in self.active_runs():
                if run.key == name_or_id or run.execution_id.startswith(name_or_id):
                    run.cancel()
                    run.wait(30)
        return self.store.forget(name_or_id, force=force, vacuum=vacuum)

    def prune(
        self,
        *,
        older_than: float | str | None = None,
        keep_latest: int = 1,
        dry_run: bool = False,
        vacuum: bool = False,
    ) -> Removal:
        """Remove completed executions beyond the ``keep_latest`` latest of each key (finished more
        than ``older_than`` ago, e.g. ``"7d"``); never one that did not complete. ``dry_run``: report
        what would go and the bytes it frees, changing nothing. ``vacuum``: give the space back."""
        return self.store.prune(older_than=older_than, keep_latest=keep_latest, dry_run=dry_run, vacuum=vacuum)

    def sizes(self) -> StoreSize:
        """The store's size and, per workflow, its executions and the bytes they take."""
        return self.store.sizes()

    def _retain(self) -> None:
        """The automatic retention: a prune in the background, at most every RETENTION_EVERY seconds."""
        if self._retention is None:
            return
        now = time.monotonic()
        with self._lock:
            if self._retained_at is not None and now - self._retained_at < defaults.RETENTION_EVERY:
                return
            self._retained_at = now
        age = self._retention

        def prune() -> None:
            try:
                self.store.prune(older_than=age)
            except Exception as exc:  # the next run tries again; the error is kept for whoever looks
                self.retention_error = exc
                with self._lock:
                    self._retained_at = None
            else:
                self.retention_error = None

        threading.Thread(target=prune, name="durable-retention", daemon=True).start()

    def close(self) -> None:
        self.store.close()

    # -- running --------------------------------------------------------------------------

    def run(
        self, code: str, namespace: Mapping[str, Any] | None = None, *, key: str | None = None, **options: Any
    ) -> Any:
        """Run to completion and return the value of the code's last expression.

        Ctrl-C stops waiting and interrupts the execution (it can be resumed).
        """
        run = self.start(code, namespace, key=key, **options)
        return wait_for(run)

    def start(
        self,
        code: str,
        namespace: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        rerun: bool = False,
        options: RunOptions | None = None,
        print_callback: PrintCallback | None = None,
        paused: bool = False,
        rerun_functions: tuple[str, ...] | list[str] = (),
        detach: bool = False,
        **option_fields: Any,
    ) -> Run:
        """Start (or resume, or answer from the store) and return a run at once.

        With ``detach`` the run is handed over to runners (``durable-monty-nb runner``): the
        values the code reads and its functions are captured, signed, in the store, and the handle
        watches the store (see :mod:`.detached`); run again, it returns the stored result once the
        run completed, else it watches the run again.

        With ``paused`` no call is dispatched until ``run.begin()`` (views use it to show
        themselves first); the code has been checked and started up to its first call.
        ``options`` (a :class:`~.options.RunOptions`), and the same fields as keywords
        (``workers``, ``retry``, ``executor``, ``timeout``, ``concurrency``, ``rate``), override
        the engine's for this run.
        ``rerun`` runs every call again; ``rerun_functions`` the calls of the functions it names
        (the others are reused as usual).
        """
        chosen_options = (options or RunOptions()).with_overrides(**option_fields)
        if detach:
            if rerun_functions or paused:
                raise DurableError("a detached run takes neither rerun_functions nor paused; nothing ran")
            from .detached import start_detached

            self._retain()
            return start_detached(self, code, namespace, key=key, rerun=rerun, options=chosen_options)
        info = analyze(code)
        key = key or f"code-{info.code_hash[:12]}"
        self._retain()
        ns = dict(namespace or {})
        rerun_functions = check_rerun_functions(rerun_functions, info, ns)
        settings = self._settings(chosen_options)
        chosen = self._backend(chosen_options.executor, chosen_options.workers)
        latest = self.store.latest_execution(key)
        if latest is not None:
            attached = self._attach(latest, info)
            if attached is not None:
                return attached
        check_names(info, ns, latest)
        codec = ValueCodec(self.store.load_blob)
        fingerprinter = Fingerprinter()
        inputs, fingerprints = prepare_inputs(info, ns, codec, fingerprinter)
        if rerun:
            fingerprints["rerun"] = True
        if rerun_functions:
            fingerprints["rerun_functions"] = sorted(rerun_functions)
        if latest is not None and not rerun:
            same_code = latest.code_hash == info.code_hash
            same_inputs = _same_fingerprints(latest.fingerprints, fingerprints)
            if same_code and latest.status == "completed" and same_inputs and not rerun_functions:
                return self._stored_run(latest)
            if same_code and latest.status in UNFINISHED and same_inputs and not rerun_functions:
                return self._resume(
                    latest,
                    ns,
                    settings,
                    chosen,
                    print_callback,
                    info=info,
                    codec=codec,
                    inputs=inputs,
                    paused=paused,
                    fingerprinter=fingerprinter,
                )
            if latest.status == "running" and lease_held(latest):
                raise ExecutionBusy(
                    self._busy_message(latest.id, key, latest.lease_owner, "before running changed code")
                )
        return self._start_new(
            info,
            key,
            ns,
            inputs,
            fingerprints,
            codec,
            settings,
            chosen,
            print_callback,
            previous=latest,
            reuse=latest is not None and not rerun,
            paused=paused,
            fingerprinter=fingerprinter,
            rerun_functions=rerun_functions,
        )

    def resume(
        self,
        name_or_id: str,
        namespace: Mapping[str, Any] | None = None,
        *,
        options: RunOptions | None = None,
        print_callback: PrintCallback | None = None,
        paused: bool = False,
        **option_fields: Any,
    ) -> Run:
        """Continue an unfinished execution (by key or id) where it stopped.

        Its completed calls are kept even when a function they called changed since (say so by
        resuming: running the code again with ``start`` runs the changed function's calls again).
        When a value the code read changed, its snapshot holds the old one: a new execution of
        the key starts instead, reusing every completed call that is still valid.

        A completed execution returns its stored result. Raises MissingFunctionsError (changing
        nothing) when the namespace lacks functions the execution still has to call. ``options``
        and option keywords: as :meth:`start`.
        """
        chosen_options = (options or RunOptions()).with_overrides(**option_fields)
        row = self.store.find_execution(name_or_id)
        info = analyze(row.code, batching=row.batching)  # the code its checkpoints run
        attached = self._attach(row, info)
        if attached is not None:
            return attached
        completed = self._completed_here(row.id)  # what it did here, rather than the stored copy
        if completed is not None:
            return completed
        if row.status == "completed":
            return self._stored_run(row)
        ns = dict(namespace or {})
        check_names(info, ns, row)
        codec = ValueCodec(self.store.load_blob)
        fingerprinter = Fingerprinter()
        inputs, fingerprints = prepare_inputs(info, ns, codec, fingerprinter)
        settings = self._settings(chosen_options)
        chosen = self._backend(chosen_options.executor, chosen_options.workers)
        if not _same_reads(row.fingerprints, fingerprints) and self.store.latest_execution(row.key).id == row.id:
            if row.status == "running" and lease_held(row):
                raise ExecutionBusy(self._busy_message(row.id, row.key, row.lease_owner, "before resuming it"))
            return self._start_new(
                info,
                row.key,
                ns,
                inputs,
                fingerprints,
                codec,
                settings,
                chosen,
                print_callback,
                previous=row,
                reuse=True,
                paused=paused,
                fingerprinter=fingerprinter,
            )
        return self._resume(
            row,
            ns,
            settings,
            chosen,
            print_callback,
            info=info,
            codec=codec,
            inputs=inputs,
            paused=paused,
            fingerprinter=fingerprinter,
        )

    def resume_all(self, namespace: Mapping[str, Any] | None = None, **options: Any) -> list[Run]:
        """Resume every unfinished execution nobody alive drives."""
        return [self.resume(row.id, namespace, **options) for row in self.store.unfinished_executions()]

    def cancel(self, name_or_id: str) -> bool:
        """Interrupt an execution this process drives, or a detached one (its runner stops it);
        False if neither."""
        row = self.store.find_execution(name_or_id)
        with self._lock:
            driver = self._active.get(row.id)
        if driver is None or driver.run.done:  # finished, its driver not yet forgotten: nothing to interrupt
            from .detached import cancel_detached

            return row.status != "completed" and cancel_detached(self.store, row.id)
        driver.request_stop()
        return True

    def signal(
        self,
        name_or_id: str,
        signal: str,
        value: Any = None,
        *,
        idempotency_key: str | None = None,
        source: str = "engine",
    ) -> Any:
        """Deliver ``signal`` (with ``value``) to an execution: the latest of a key, or an id.

        Kept in the execution's mailbox until ``await signal(name)`` takes it (exactly once);
        a repeated ``idempotency_key`` is ignored. Returns a ``Delivery``. A driver of this
        process wakes at once; one in another process finds it within its heartbeat.
        """
        from ..signals import deliver_signal

        return deliver_signal(self.store, name_or_id, signal, value, idempotency_key=idempotency_key, source=source)

    def active_runs(self) -> list[Run]:
        with self._lock:
            return [driver.run for driver in self._active.values()]

    def executions(self, *, all: bool = False, key: str | None = None) -> list[Any]:
        """Rows of the store's executions: the latest of each key, or every one with ``all``."""
        return self.store.list_executions(latest_only=not all, key=key)

    # -- internals -----------------------------------------------------------------------

    def _settings(self, options: RunOptions) -> Settings:
        """The engine's settings with a run's options (checked when the options were made)."""
        return Settings(
            workers=options.workers or self.settings.workers,
            retry=options.retry or self.settings.retry,
            lease_ttl=self.settings.lease_ttl,
            controls=options.controls.over(self.settings.controls),
            store_outage_limit=self.settings.store_outage_limit,
            clock=self.settings.clock,
        )

    def _backend(self, executor: str | Backend | None, workers: int | None) -> Backend:
        """The run's backend (checked: an unreachable one raises before anything runs)."""
        if executor is None:
            chosen = self.executor
            if workers and "workers" in getattr(chosen, "__dataclass_fields__", ()):
                chosen = dataclasses.replace(chosen, workers=workers)  # type: ignore[type-var]
        else:
            chosen = backend(executor, workers=workers or self.settings.workers)
        chosen.check()
        return chosen

    def _busy_message(self, execution_id: str, key: str, owner: str | None, purpose: str = "") -> str:
        """Who drives an execution, when its lease lapses, and how to wait for it or take it over."""
        row = self.store.get_execution(execution_id)
        left = max((row.lease_expires_at or 0.0) - time.time(), 0.0)
        then = f" {purpose}" if purpose else ""
        return (
            f"execution {execution_id[:12]} ({key!r}) is being driven by {describe_owner(owner)}. "
            f"Its lease runs for {left:.0f} s more and is renewed while that process lives. "
            f"Wait for it to finish{then} (%durable_status {key} shows its progress), or stop that process "
            f"(interrupt or kill it): a resume then takes over at once on this machine, or within "
            f"{left:.0f} s from another one."
        )

    def _open_executor(self, chosen: Backend, execution_id: str, key: str) -> Any:
        return chosen.open(RunContext(execution_id, key, self.store.url, self.store.signer))

    def _attach(self, row: Any, info: CodeInfo) -> Run | None:
        """The run of an execution this process already drives (re-activated if stopping)."""
        with self._lock:
            driver = self._active.get(row.id)
        if driver is None or driver.run.done:
            return None
        if driver.info.code_hash != info.code_hash:
            raise ExecutionBusy(
                f"{row.key!r} is still running here with other code; cancel it first "
                f"(Run.cancel() or %durable_cancel {row.key})"
            )
        if driver.reactivate():
            return driver.run
        driver.run.wait()
        return None

    def _completed_here(self, execution_id: str) -> Run | None:
        """The run of this process that completed the execution, while it is remembered."""
        with self._lock:
            driver = self._active.get(execution_id)
            if driver is not None and driver.run.done and driver.run.status == "completed":
                return driver.run
            return self._completed.get(execution_id)

    def _stored_run(self, row: Any) -> Run:
        self.store.verify_execution_result(row)
        codec = ValueCodec(self.store.load_blob)
        run = Run(row.id, row.key, source=StoredCalls(self.store, row.id))
        run.cached = True
        run._explain = functools.partial(explain, self.store, row.id, cached=True)
        run.started_at = row.created_at
        progress = Progress(
            total=row.calls_total,
            done=row.calls_done,
            failed=row.calls_failed,
            restored=row.calls_done,
            reused=row.calls_reused,
        )
        run._finish(
            "completed",
            result=codec.decode_host(row.result),
            outputs=codec.decode_host(row.outputs),
            progress=progress,
            finished_at=row.finished_at,
        )
        return run

    def _subscribe_printer(self, run: Run, print_callback: PrintCallback | None) -> Callable[[str, str], None]:
        printer = print_callback or default_printer

        def on_event(event: Any) -> None:
            if isinstance(event, Printed):
                printer(event.stream, event.text)

        run.subscribe(on_event)

        def emit(stream: str, text: str) -> None:
            run.events.emit(Printed(run.execution_id, stream, text))

        return emit

    def _start_new(
        self,
        info: CodeInfo,
        key: str,
        ns: dict[str, Any],
        inputs: dict[str, Any],
        fingerprints: dict[str, Any],
        codec: ValueCodec,
        settings: Settings,
        chosen: Backend,
        print_callback: PrintCallback | None,
        *,
        previous: Any,
        reuse: bool,
        paused: bool = False,
        fingerprinter: Fingerprinter | None = None,
        rerun_functions: frozenset[str] = frozenset(),
    ) -> Run:
        shipped = ship_functions(info, ns, fingerprints) if chosen.remote else {}
        execution_id = uuid.uuid4().hex
        run = Run(execution_id, key)
        emit = self._subscribe_printer(run, print_callback)
        session = sandbox.open_session()
        try:
            session.feed_start(sandbox.PRELUDE)
            snapshot = session.feed_start(info.fed, print_callback=emit)
        except MontySyntaxError as exc:
            sandbox.close_session(session)
            raise WorkflowCodeError(_code_error_message(exc, key), line=_error_line(exc)) from None
        except MontyRuntimeError as exc:
            sandbox.close_session(session)
            text = format_monty_error(exc, key, sources=(info.code, info.fed))
            inner = exc.exception()
            if isinstance(inner, NotImplementedError) or _is_parse_error(exc):
                raise WorkflowCodeError(f"unsupported in workflow code: {text}", line=_error_line(exc)) from None
            raise WorkflowFailed(f"{type(inner).__name__}: {inner}", text, "", type(inner).__name__) from None
        except BaseException:
            sandbox.close_session(session)
            raise
        owner = new_owner()
        values = execution_values(self.store, execution_id, key, info, fingerprints, previous)
        if not self.store.create_execution(
            values, owner, settings.lease_ttl, expected_latest=previous.id if previous is not None else None
        ):
            sandbox.close_session(session)
            now_latest = self.store.latest_execution(key)
            raise ExecutionBusy(
                f"another process started {key!r} at the same moment (execution "
                f"{now_latest.id[:12] if now_latest else '?'}); run again to join its result"
            )
        run.started_at = time.time()
        driver = Driver(
            store=self.store,
            codec=codec,
            info=info,
            run=run,
            owner=owner,
            namespace=ns,
            inputs=inputs,
            settings=settings,
            executor=self._open_executor(chosen, execution_id, key),
            session=session,
            snapshot=snapshot,
            shipped=shipped,
            reuse_key=key if reuse else None,
            on_exit=self._forget,
            fingerprinter=fingerprinter,
            rerun_functions=rerun_functions,
        )
        return self._launch(driver, resumed=False, paused=paused)

    def _resume(
        self,
        row: Any,
        ns: dict[str, Any],
        settings: Settings,
        chosen: Backend,
        print_callback: PrintCallback | None,
        *,
        info: CodeInfo,
        codec: ValueCodec,
        inputs: dict[str, Any],
        paused: bool = False,
        fingerprinter: Fingerprinter | None = None,
    ) -> Run:
        retry_failed = row.status == "failed"
        calls = self.store.load_calls(row.id)
        waiting = ("pending", "retrying", "failed") if retry_failed else ("pending", "retrying")
        # Unpacked (rows in CALL_FIELDS order): attribute access on 10,000 rows costs 8 ms.
        needed = {function for _, function, kind, _, _, status, *_ in calls if kind == "call" and status in waiting}
        missing = sorted(name for name in needed if not callable(ns.get(name)))
        if missing:
            raise MissingFunctionsError(
                f"execution {row.id[:12]} ({row.key!r}) still has to call {', '.join(missing)}, which the "
                f"namespace does not define. Define them (run the cells that do), then resume again. "
                f"Nothing was lost: {row.calls_done} of {row.calls_total} calls are done."
            )
        owner, fresh = lease_and_read(
            self.store, row.id, settings.lease_ttl, lambda busy: self._busy_message(row.id, row.key, busy)
        )
        if fresh.status == "completed":
            give_back(self.store, row.id, owner)
            return self._stored_run(fresh)
        if fresh.updated_at != row.updated_at or fresh.status != row.status:
            row, calls = fresh, self.store.load_calls(row.id)
            retry_failed = row.status == "failed"
        run = Run(row.id, row.key)
        emit = self._subscribe_printer(run, print_callback)
        session = None
        try:
            session, snapshot, _ = open_at_checkpoint(self.store, row, info, emit)
            run.started_at = time.time()
            driver = Driver(
                store=self.store,
                codec=codec,
                info=info,
                run=run,
                owner=owner,
                namespace=ns,
                inputs=inputs,
                settings=settings,
                executor=self._open_executor(chosen, row.id, row.key),
                session=session,
                snapshot=snapshot,
                restored_calls=calls,
                retry_failed=retry_failed,
                on_exit=self._forget,
                fingerprinter=fingerprinter,
            )
        except BaseException:
            sandbox.close_session(session)
            give_back(self.store, row.id, owner)
            raise
        return self._launch(driver, resumed=True, paused=paused)

    def _launch(self, driver: Driver, *, resumed: bool, paused: bool) -> Run:
        with self._lock:
            self._active[driver.execution_id] = driver
        run = driver.run
        run._explain = functools.partial(explain, self.store, driver.execution_id)
        c = driver.counters
        run.events.emit(ExecutionStarted(driver.execution_id, driver.key, resumed, c.restored, c.reused))
        driver.start(paused=paused)
        return run

    def _forget(self, driver: Driver) -> None:
        with self._lock:
            if self._active.get(driver.execution_id) is driver:
                del self._active[driver.execution_id]
            if driver.run.status == "completed":  # resuming it says what it did, not "restored"
                self._completed[driver.execution_id] = driver.run
                while len(self._completed) > COMPLETED_KEPT:
                    del self._completed[next(iter(self._completed))]


class StoredCalls:
    """The run source of an execution this process does not drive: its rows in the store."""

    def __init__(self, store: Store, execution_id: str) -> None:
        self._store = store
        self._execution_id = execution_id

    def progress(self) -> Progress:
        row = self._store.get_execution(self._execution_id)
        return Progress(total=row.calls_total, done=row.calls_done, failed=row.calls_failed, reused=row.calls_reused)

    def call_views(self) -> list[CallView]:
        return stored_call_views(self._store.load_calls(self._execution_id))

    def begin(self) -> None:
        return None

    def request_stop(self) -> None:
        return None


def lease_and_read(store: Store, execution_id: str, lease_ttl: float, busy: Callable[[str], str]) -> tuple[str, Any]:
    """Take an execution's lease and read its row again under it: (owner, the row now).

    Another process may have finished or advanced the execution since it was read (a finished
    run's lease is free too); nobody changes it while the lease is ours. ExecutionBusy, with
    ``busy(holder)`` as its message, when another holds it.
    """
    owner = new_owner()
    holder = store.acquire_lease(execution_id, owner, lease_ttl)
    if holder is not None:
        release_owner(owner)
        raise ExecutionBusy(busy(holder))
    try:
        return owner, store.get_execution(execution_id)
    except BaseException:
        give_back(store, execution_id, owner)
        raise


def give_back(store: Store, execution_id: str, owner: str) -> None:
    """Release a lease taken by :func:`lease_and_read` that no driver took on."""
    try:
        store.release_lease(execution_id, owner)
    finally:
        release_owner(owner)


def open_at_checkpoint(
    store: Store, row: Any, info: CodeInfo, emit: Callable[[str, str], None]
) -> tuple[Any, Any, bool]:
    """A Monty session at an execution's latest checkpoint, after its signed code is verified:
    (session, snapshot, restored); with no checkpoint yet, the code started from its beginning."""
    store.signer.verify_text(f"code:{row.id}", row.code, row.code_sig, f"the code of execution {row.id}")
    data = store.load_checkpoint(row.id)
    session = sandbox.open_session()
    try:
        if data is None:
            session.feed_start(sandbox.PRELUDE)
            return session, session.feed_start(info.fed, print_callback=emit), False
        return session, session.load_snapshot(data, print_callback=emit), True
    except BaseException:
        sandbox.close_session(session)
        raise


def wait_for(run: Run) -> Any:
    """Wait for a run's result; Ctrl-C interrupts the execution (resumable) and re-raises."""
    try:
        while not run.wait(0.25):
            pass
    except KeyboardInterrupt:
        run.cancel()
        raise
    return run.result()


def check_rerun_functions(names: Any, info: CodeInfo, namespace: Mapping[str, Any]) -> frozenset[str]:
    """The functions whose calls run again (a clear error, before anything runs, for a name that is none)."""
    if isinstance(names, str):
        names = (names,)
    chosen = frozenset(names or ())
    unknown = sorted(name for name in chosen if not callable(namespace.get(name)))
    if unknown:
        raise DurableError(
            f"cannot re-run the calls of {', '.join(map(repr, unknown))}: not a function of the namespace. "
            f"Name a function the code calls. Nothing ran."
        )
    return chosen


def _error_line(exc: MontyError) -> int | None:
    try:
        frames = exc.traceback()  # type: ignore[attr-defined]
    except Exception:
        return None
    lines = [f.line for f in frames if f.filename.endswith("-1>")]
    return lines[-1] if lines else None


def _is_parse_error(exc: MontyRuntimeError) -> bool:
    return "parser does not" in str(exc) or "not supported" in str(exc)


def _code_error_message(exc: MontySyntaxError, key: str) -> str:
    line = _error_line(exc)
    where = f" at line {line}" if line else ""
    return f"syntax error{where} of the workflow code:\n{format_monty_error(exc, key)}"
