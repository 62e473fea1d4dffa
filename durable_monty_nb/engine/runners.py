"""The runner (``durable-monty-nb runner``): drives the detached executions of a store.

It finds armed hand-overs (:mod:`durable_monty_nb.store.handoffs`), claims each through the
execution's lease, verifies the hand-over's signature (a runner with another signing key says so
and leaves the run for one that has the key), restores the checkpoint and drives the run with its
executor, the functions loaded from their signed pickles. A runner killed mid-run loses its lease;
another one takes the run over and runs no completed call again. Two runners never drive one
execution at once: every write of a driver is fenced by the lease.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .. import defaults
from ..errors import DurableError, ExecutionBusy, StoreError, TamperedDataError
from ..executors import backend
from ..store import handoffs
from ..store.owners import describe_owner, lease_held
from ..store.store import UNFINISHED, Store
from ..values import ValueCodec
from . import sandbox
from .analysis import analyze
from .detached import LIVE_COUNTS, _options_of
from .driver import Driver
from .engine import Engine, give_back, lease_and_read, open_at_checkpoint
from .run import Run

STOP_GRACE = 30.0  # seconds a stopping runner waits for the calls running in its own threads


class Runner:
    """Drives detached executions of a store (``durable-monty-nb runner``).

    ``settings`` are executor settings by name (``{"rq": {"url": ...}}``); ``max_runs`` the most
    executions driven at once (None: no limit). :meth:`step` claims what it can and ends what
    finished; :meth:`serve` repeats it every ``poll`` seconds until ``stop`` is set.
    """

    def __init__(
        self,
        db: str | None = None,
        *,
        secret: bytes | str | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        workers: int | None = None,
        max_runs: int | None = None,
        lease_ttl: float = defaults.LEASE_TTL,
        poll: float = 0.5,
        name: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if max_runs is not None and max_runs < 1:
            raise ValueError(f"max_runs must be at least 1, not {max_runs}")
        self.engine = Engine(db, secret=secret, lease_ttl=lease_ttl, workers=workers or defaults.WORKERS)
        self.store: Store = self.engine.store
        self.settings = {name: dict(values) for name, values in (settings or {}).items()}
        self.workers = workers
        self.max_runs = max_runs
        self.poll = poll
        self.name = name or f"runner {socket.gethostname()}:{os.getpid()}"
        self.log = log or (lambda text: print(text, flush=True))
        self.runs: dict[str, Run] = {}
        self._refused: dict[str, str] = {}  # execution id -> the signature refused (said once)
        self._stopping = False
        self._cancelled: list[Run] = []  # runs a cancel request was passed on to
        self._published: dict[str, dict[str, Any]] = {}  # execution id -> the live counts written last

    def step(self) -> None:
        """One round: end finished runs, pass on cancel requests, claim armed hand-overs."""
        for execution_id, run in list(self.runs.items()):
            if run.done:
                del self.runs[execution_id]
                self._published.pop(execution_id, None)
                if run in self._cancelled:
                    self._cancelled.remove(run)
                if not self._stopping:
                    with contextlib.suppress(StoreError):
                        self._ended(run)
                self.log(f"{self.name}: {run.key!r} ({execution_id[:12]}) {run.status}")
        armed = handoffs.armed_handoffs(self.store)
        for handoff in armed:
            run = self.runs.get(handoff.execution_id)
            if run is not None and handoff.cancel_requested_at and not run.done and run not in self._cancelled:
                self._cancelled.append(run)
                run.cancel()
                self.log(f"{self.name}: cancels {run.key!r} ({run.execution_id[:12]}), as asked through the store")
        self._publish()
        for handoff in armed:
            if self._stopping or (self.max_runs is not None and len(self.runs) >= self.max_runs):
                break
            if handoff.execution_id not in self.runs:
                self._claim(handoff)

    def _publish(self) -> None:
        """Write the live counts (running, queued, ...) of each run driven here that changed since
        the last round, for the notebooks that watch it (the store's rows hold only the totals)."""
        for execution_id, run in list(self.runs.items()):
            if run.done:
                continue
            progress = run.progress
            counts: dict[str, Any] = {name: getattr(progress, name) for name in LIVE_COUNTS}
            if progress.expected is not None:  # the total the code will reach: views show a bar
                counts["expected"] = progress.expected
            if progress.note:
                counts["note"] = progress.note
            counts["calls"] = run.live_calls()  # which calls run, wait, ... (the rows say pending)
            counts["owner"] = run.lease_owner  # readers trust the lease holder's counts only
            if self._published.get(execution_id) != counts:
                handoffs.write_progress(self.store, execution_id, counts)
                self._published[execution_id] = counts

    def _ended(self, run: Run) -> None:
        """A run driven here ended: no runner drives it any more, unless it stopped uncancelled (its
        lease lost, the store away too long) or its cell handed it over again meanwhile; then the
        next round (here or in another runner) takes it up again."""
        if run.status == "interrupted":
            handoff = handoffs.load_handoff(self.store, run.execution_id)
            if handoff is not None and handoff.armed and not handoff.cancel_requested_at:
                return
        handoffs.disarm(self.store, run.execution_id)

    def _claim(self, handoff: handoffs.Handoff) -> None:
        store = self.store
        row = store.get_execution(handoff.execution_id)
        if row.status == "completed":
            handoffs.disarm(store, row.id)
            return
        if lease_held(row):
            return
        if handoff.cancel_requested_at:
            handoffs.interrupt_unclaimed(store, row.id)
            return
        try:
            handoffs.verify_handoff(store, handoff)
            namespace, inputs = self._namespace(handoff)
            run = self._drive(row, handoff, namespace, inputs)
        except ExecutionBusy:
            return  # another runner claimed it first
        except Ended as ended:
            if str(ended) == "completed":
                handoffs.disarm(store, row.id)
            return
        except (TamperedDataError, DurableError) as exc:  # another key, a tampered row, an executor out of reach
            if isinstance(exc, StoreError) and not isinstance(exc, TamperedDataError):
                raise  # an outage: the next round tries again
            if self._refused.get(row.id) != handoff.signature:
                self._refused[row.id] = handoff.signature
                message = f"{self.name} refused {row.key!r}: {exc}"
                self.log(message)
                handoffs.mark_refused(store, row.id, message)
            return
        self.runs[row.id] = run
        handoffs.mark_claimed(store, row.id, self.name)
        self.log(f"{self.name}: drives {row.key!r} ({row.id[:12]}, {handoff.executor})")

    def _namespace(self, handoff: handoffs.Handoff) -> tuple[dict[str, Any], dict[str, Any]]:
        """The functions (verified pickles) and the sandbox values of the names the code reads."""
        import cloudpickle

        namespace: dict[str, Any] = {}
        for name, key in handoff.functions.items():
            data = self.store.load_function(key)  # verified: TamperedDataError otherwise
            try:
                namespace[name] = cloudpickle.loads(data)
            except Exception as exc:  # a module missing here: its calls fail with the error and the hint
                namespace[name] = _unloadable(name, exc, self.name)
        codec = ValueCodec(self.store.load_blob)
        inputs = {name: codec.decode_sandbox(text) for name, text in handoff.inputs.items()}
        for text in handoff.inputs.values():
            if '"$h"' in text:  # blobs: verified now rather than at the first call that reads them
                codec.decode_host(text)
        return namespace, inputs

    def _drive(self, row: Any, handoff: handoffs.Handoff, namespace: dict[str, Any], inputs: dict[str, Any]) -> Run:
        engine = self.engine
        options = _options_of(handoff.options)
        settings = engine._settings(options)
        workers = options.workers or self.workers or defaults.WORKERS
        chosen = backend(handoff.executor, workers=workers, **self.settings.get(handoff.executor, {}))
        chosen.check()
        info = analyze(row.code, batching=row.batching)  # the code its checkpoints run
        owner, row = lease_and_read(
            self.store,
            row.id,
            settings.lease_ttl,
            lambda busy: f"execution {row.id[:12]} is driven by {describe_owner(busy)}",
        )
        run = Run(row.id, row.key)
        emit = engine._subscribe_printer(run, lambda stream, text: None)
        session = None
        try:
            if row.status not in UNFINISHED:
                raise Ended(row.status)
            retry_failed = row.status == "failed"
            calls = self.store.load_calls(row.id)
            session, snapshot, restored = open_at_checkpoint(self.store, row, info, emit)
            run.started_at = time.time()
            driver = Driver(
                store=self.store,
                codec=ValueCodec(self.store.load_blob),
                info=info,
                run=run,
                owner=owner,
                namespace=namespace,
                inputs=inputs,
                settings=settings,
                executor=engine._open_executor(chosen, row.id, row.key),
                session=session,
                snapshot=snapshot,
                restored_calls=calls if restored or calls else None,
                retry_failed=retry_failed,
                reuse_key=row.key if handoff.options.get("reuse") and not restored else None,
                on_exit=engine._forget,
            )
        except BaseException:
            sandbox.close_session(session)
            give_back(self.store, row.id, owner)
            raise
        return engine._launch(driver, resumed=restored, paused=False)

    def serve(self, stop: threading.Event | None = None) -> None:
        """Claim and drive until ``stop`` is set (or Ctrl-C); then stop the runs driven here,
        which other runners take over (their hand-overs stay armed)."""
        stop = stop or threading.Event()
        self.log(f"{self.name}: watching {self.store.display_url} for detached runs")
        try:
            while not stop.is_set():
                try:
                    self.step()
                except StoreError as exc:  # an outage: the drivers ride it out, the next round tries again
                    self.log(f"{self.name}: store unreachable ({exc}); trying again")
                except DurableError as exc:
                    self.log(f"{self.name}: {type(exc).__name__}: {exc}")
                except Exception as exc:  # a runner outlives what one round meets; the next round tries again
                    self.log(f"{self.name}: unexpected {type(exc).__name__}: {exc}")
                stop.wait(self.poll)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the runs driven here, for other runners to take over: no new call starts, calls
        running in this process finish and are journaled first (those on workers go on there)."""
        self._stopping = True
        if self.runs:
            self.log(f"{self.name}: stopping; its {len(self.runs)} run(s) are left to another runner")
        for run in list(self.runs.values()):
            run.cancel()
        deadline = time.monotonic() + STOP_GRACE
        for run in list(self.runs.values()):
            if not run.wait(max(0.0, deadline - time.monotonic())):
                self.log(
                    f"{self.name}: {run.key!r} ({run.execution_id[:12]}) still had calls running after "
                    f"{STOP_GRACE:.0f} s; they stop with this process and run again in the next runner"
                )
        self.runs.clear()
        self.engine.close()


class Ended(Exception):
    """The execution ended (its status in the message) before this runner held its lease."""


def _unloadable(name: str, exc: Exception, runner: str) -> Callable[..., Any]:
    message = (
        f"the function {name!r} could not be loaded on {runner}: {type(exc).__name__}: {exc}. Install what it "
        f"imports in the runner's environment (or ship a module of your own with "
        f"cloudpickle.register_pickle_by_value(module) in the notebook), then run the cell again."
    )

    def unloadable(*args: Any, **kwargs: Any) -> Any:
        raise ModuleNotFoundError(message) if isinstance(exc, ImportError) else RuntimeError(message)

    unloadable.__name__ = name
    return unloadable
