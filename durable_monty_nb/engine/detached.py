"""Runs that outlive the kernel: hand a run over to runners, watch it from any process, drive it.

- :func:`start_detached` (``Engine.start(..., detach=True)``): captures the values of the names
  the code reads (the store's codec; objects as signed blobs) and its functions (shipped by value,
  signed), writes the execution and its hand-over, and returns a :class:`~.run.Run` that
  watches the store. Run again with the same code and inputs: the stored result once it
  completed, else the same watching run.
- :func:`watch`: the run of an execution another process drives, polling the store; the same
  protocol as the in-process ``Run`` (progress, calls, wait, result, outputs, cancel, signal).

:class:`~.runners.Runner` (``durable-monty-nb runner``) drives them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from .. import defaults
from ..errors import (
    ExecutionBusy,
    NotCancellable,
    StoreError,
    WorkflowFailed,
    interrupted_error,
)
from ..signals import deliver_signal, waits_from_store
from ..store import handoffs
from ..store.owners import describe_owner, lease_held, new_owner, release_owner
from ..store.store import UNFINISHED, Store, execution_state
from ..values import ValueCodec
from .analysis import analyze
from .controls import Rate
from .driver import stored_call_views
from .fingerprint import Fingerprinter
from .inputs import _same_fingerprints, check_names, execution_values, prepare_inputs, ship_functions
from .options import RunOptions
from .retry import RetryPolicy
from .run import CallView, Progress, Run
from .why import explain

LIVE_COUNTS = ("running", "queued", "retrying", "waiting", "limited", "signals", "external")
CLAIM_WAIT = 3.0  # seconds before a watcher says that no runner has claimed the run
POLL = 0.25  # seconds between a watcher's reads of the store


def runner_command(store: Store) -> str:
    return f"durable-monty-nb runner --db '{store.display_url}'"


# -- handing over --------------------------------------------------------------------------------


def start_detached(
    engine: Any, code: str, namespace: Mapping[str, Any] | None, *, key: str | None, rerun: bool, options: RunOptions
) -> Run:
    """Hand the run over to runners and return a run that watches it (see the module docstring)."""
    store: Store = engine.store
    info = analyze(code)
    key = key or f"code-{info.code_hash[:12]}"
    ns = dict(namespace or {})
    latest = store.latest_execution(key)
    check_names(info, ns, latest)
    codec = ValueCodec(store.load_blob)
    inputs, fingerprints = prepare_inputs(info, ns, codec, Fingerprinter())
    if rerun:
        fingerprints["rerun"] = True
    executor = _executor_name(options.executor or engine.executor)
    if latest is not None and not rerun:
        same = latest.code_hash == info.code_hash and _same_fingerprints(latest.fingerprints, fingerprints)
        if same and latest.status == "completed":
            return engine._stored_run(latest)
        if same and latest.status in UNFINISHED:
            current = handoffs.load_handoff(store, latest.id)
            if lease_held(latest) and (current is None or not current.armed):
                raise ExecutionBusy(engine._busy_message(latest.id, key, latest.lease_owner, "before handing it over"))
            if not (lease_held(latest) and current is not None and current.armed and not current.cancel_requested_at):
                # Handed over again (after a cancel, a failure, a fix): a runner resumes it.
                _write(store, latest.id, info, ns, inputs, fingerprints, codec, executor, options, reuse=False)
            return watch(store, latest.id, key)
        if latest.status == "running" and lease_held(latest):
            raise ExecutionBusy(engine._busy_message(latest.id, key, latest.lease_owner, "before running changed code"))
    execution_id = uuid.uuid4().hex
    owner = new_owner()
    values = execution_values(store, execution_id, key, info, fingerprints, latest)
    if not store.create_execution(
        values, owner, engine.settings.lease_ttl, expected_latest=latest.id if latest is not None else None
    ):
        release_owner(owner)
        raise ExecutionBusy(f"another process started {key!r} at the same moment; run again to join it")
    try:
        _write(store, execution_id, info, ns, inputs, fingerprints, codec, executor, options, reuse=latest is not None)
    finally:
        store.release_lease(execution_id, owner)
        release_owner(owner)
    return watch(store, execution_id, key)


def _write(
    store: Store,
    execution_id: str,
    info: Any,
    ns: dict[str, Any],
    inputs: dict[str, Any],
    fingerprints: dict[str, Any],
    codec: ValueCodec,
    executor: str,
    options: RunOptions,
    *,
    reuse: bool,
) -> None:
    shipped = ship_functions(info, ns, fingerprints)
    texts = {name: codec.encode_text(ns[name], what=f"the notebook variable {name!r}") for name in inputs}
    handoffs.write_handoff(
        store,
        execution_id,
        executor=executor,
        options={**_options_data(options), "reuse": reuse},
        inputs=texts,
        functions={key: (name, fingerprint, data) for name, (key, fingerprint, data) in shipped.items()},
        blobs=dict(codec.pending_blobs),
    )


def _executor_name(executor: Any) -> str:
    return executor if isinstance(executor, str) else getattr(executor, "name", defaults.EXECUTOR)


def state_of(row: Any, detached: bool) -> str:
    """An execution's status for views: ``handed over`` for a detached run no runner drives now
    (its lease is free, as a crashed run's is, but a runner will take it)."""
    state = execution_state(row)
    return "handed over" if state == "crashed" and detached else state


def _options_data(options: RunOptions) -> dict[str, Any]:
    data: dict[str, Any] = {"workers": options.workers, "timeout": options.timeout, "concurrency": options.concurrency}
    rate = options.rate
    data["rate"] = {"count": rate.count, "per": rate.per} if isinstance(rate, Rate) else rate
    if options.retry is not None:
        r = options.retry
        data["retry"] = {
            "retries": r.retries,
            "backoff": r.backoff,
            "delay": r.delay,
            "max_delay": r.max_delay,
            "jitter": r.jitter,
        }
    return data


def _options_of(data: Mapping[str, Any]) -> RunOptions:
    retry = data.get("retry")
    return RunOptions(
        workers=data.get("workers"),
        timeout=data.get("timeout"),
        concurrency=data.get("concurrency"),
        rate=Rate(**rate) if isinstance(rate := data.get("rate"), dict) else rate,
        retry=RetryPolicy(**retry) if retry else None,
    )


# -- watching ------------------------------------------------------------------------------------


class StoredRun:
    """The run source of an execution a runner drives: the store's rows, read when asked."""

    def __init__(self, store: Store, execution_id: str) -> None:
        self._store = store
        self._execution_id = execution_id
        self._created = time.time()

    def progress(self) -> Progress:
        """The counts of the execution's row, with the live ones (running, queued, ...) its runner
        publishes while it holds the lease."""
        row = self._store.get_execution(self._execution_id)
        handoff = handoffs.load_handoff(self._store, self._execution_id)
        live = live_counts(row, handoff)
        return Progress(
            total=row.calls_total,
            done=row.calls_done,
            failed=row.calls_failed,
            reused=row.calls_reused,
            note=self.note(row, handoff) or live.get("note"),
            expected=live.get("expected"),
            **{name: live.get(name, 0) for name in LIVE_COUNTS},
        )

    def note(self, row: Any = None, handoff: Any = False) -> str | None:
        """What keeps the run from going: no runner claimed it, or runners refused it."""
        row = row if row is not None else self._store.get_execution(self._execution_id)
        if row.status not in UNFINISHED or lease_held(row):
            return None
        if handoff is False:
            handoff = handoffs.load_handoff(self._store, self._execution_id)
        if handoff is None or not handoff.armed:
            return None
        if handoff.refusal:
            return f"refused by a runner: {handoff.refusal}"
        if time.time() - max(handoff.updated_at, self._created) < CLAIM_WAIT:
            return None
        if handoff.claimed_at is not None:
            return f"no runner drives this run since {handoff.runner} stopped; start one: {runner_command(self._store)}"
        return f"no runner has claimed this run; start one with: {runner_command(self._store)}"

    def call_views(self) -> list[CallView]:
        """The stored call rows, each unfinished one with what its runner says it does now
        (running, queued, limited, ...; the rows only say pending)."""
        views = stored_call_views(self._store.load_calls(self._execution_id))
        row = self._store.get_execution(self._execution_id)
        live = live_counts(row, handoffs.load_handoff(self._store, self._execution_id)).get("calls") or {}
        status_of = {call_id: status for status, ids in live.items() for call_id in ids}
        if not status_of:
            return views
        return [
            dataclasses.replace(view, status=status_of[view.call_id])
            if view.status == "pending" and view.call_id in status_of
            else view
            for view in views
        ]

    def begin(self) -> None:
        return None

    def request_stop(self) -> None:
        cancel_detached(self._store, self._execution_id)

    def deliver(self, name: str, value: Any = None, *, idempotency_key: str | None = None, source: str = "run") -> Any:
        row = self._store.get_execution(self._execution_id)
        return deliver_signal(
            self._store, row.id, name, value, idempotency_key=idempotency_key, source=source, execution=row
        )

    def waits(self) -> list[Any]:
        return waits_from_store(self._store, self._execution_id)

    @property
    def parked(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self.waits())
        return False


def watch(store: Store, execution_id: str, key: str) -> Run:
    """A run of an execution another process drives, finished when the store says it ended."""
    source = StoredRun(store, execution_id)
    run = Run(execution_id, key, source=source)
    run.detached = True  # type: ignore[attr-defined]
    run._explain = functools.partial(explain, store, execution_id)
    run.started_at = time.time()
    FOLLOWER.follow(store, run)
    return run


class Follower:
    """One thread of the process reads the store for every watching run, until each one ended;
    it stops when none is left and starts again with the next."""

    def __init__(self, poll: float = POLL) -> None:
        self.poll = poll
        self._lock = threading.Lock()
        self._runs: list[tuple[Store, Run]] = []
        self._thread: threading.Thread | None = None

    def follow(self, store: Store, run: Run) -> None:
        with self._lock:
            self._runs.append((store, run))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="durable-watch", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._runs = [(store, run) for store, run in self._runs if not run.done]
                if not self._runs:
                    self._thread = None  # the next follow() starts another
                    return
                runs = list(self._runs)
            away: set[int] = set()  # stores found unreachable this round: their other runs wait for the next
            for store, run in runs:
                if id(store) in away:
                    continue
                try:
                    _finished(store, run)
                except StoreError:  # an outage: keep watching, without waiting out its retries once per run
                    away.add(id(store))
                except Exception as exc:  # a result this process cannot load: that run ends with it, not the rest
                    run._finish("failed", error=exc)
            time.sleep(self.poll)


FOLLOWER = Follower()


def _finished(store: Store, run: Run) -> bool:
    row = store.get_execution(run.execution_id)
    progress = Progress(total=row.calls_total, done=row.calls_done, failed=row.calls_failed, reused=row.calls_reused)
    if row.status == "completed":
        store.verify_execution_result(row)
        codec = ValueCodec(store.load_blob)
        run._finish(
            "completed",
            result=codec.decode_host(row.result),
            outputs=codec.decode_host(row.outputs),
            progress=progress,
            finished_at=row.finished_at,
        )
        return True
    if row.status == "running":
        return False
    handoff = handoffs.load_handoff(store, row.id)
    if handoff is not None and handoff.armed and not handoff.cancel_requested_at:
        return False  # stopped with its runner (or re-armed): another runner continues it
    if row.status == "failed":
        text = row.error or ""
        summary = text.strip().splitlines()[-1] if text.strip() else row.error_type or "failed"
        error: BaseException = WorkflowFailed(summary, text, row.id, row.error_type or "")
    else:
        error = interrupted_error(row.id, row.key)
    run._finish(row.status, error=error, progress=progress, finished_at=row.finished_at)
    return True


def cancel_detached(store: Store, execution_id: str) -> bool:
    """Cancel a detached execution from any process: its runner stops it (calls already running
    finish and are kept); one no runner drives becomes interrupted at once. False when it has no
    armed hand-over."""
    if not handoffs.request_cancel(store, execution_id):
        return False
    handoffs.interrupt_unclaimed(store, execution_id)
    return True


def live_counts(row: Any, handoff: handoffs.Handoff | None) -> dict[str, Any]:
    """The live counts its runner published, written by the runner that holds the execution's lease
    now (else none: what a runner that stopped, or lost the lease, wrote last is no longer true)."""
    if handoff is None or not handoff.progress or row.status != "running" or not lease_held(row):
        return {}
    if handoff.progress.get("owner") != row.lease_owner:
        return {}
    return handoff.progress


def runner_state(row: Any, handoff: handoffs.Handoff | None) -> dict[str, Any] | None:
    """Who drives a detached execution, as data (None: it is not detached). ``state``: ``driving``
    (a runner holds its lease), ``unclaimed`` (armed, nobody drives it: no runner yet, or its
    runner stopped), ``refused`` (runners refused it, ``refusal`` says why) or ``ended``."""
    if handoff is None:
        return None
    if row.status == "running" and lease_held(row):
        state = "driving"
    elif handoff.armed and row.status in UNFINISHED:
        state = "refused" if handoff.refusal else "unclaimed"
    else:
        state = "ended"
    return {
        "runner": handoff.runner,
        "state": state,
        "owner": describe_owner(row.lease_owner) if state == "driving" else None,
        "claimed_at": handoff.claimed_at,
        "cancel_requested": handoff.cancel_requested_at is not None,
        "refusal": handoff.refusal if state == "refused" else None,
    }


def driven_by(store: Store, rows: list[Any]) -> dict[str, str]:
    """Which runner drives each detached execution among ``rows`` (or that none has claimed it)."""
    found = handoffs.handoffs_of(store, [row.id for row in rows])
    said = {}
    for row in rows:
        state = runner_state(row, found.get(row.id))
        if state is None:
            continue
        if state["state"] == "driving":
            said[row.id] = f"{state['runner'] or 'a runner'} ({state['owner']})"
        elif state["state"] in ("unclaimed", "refused"):
            said[row.id] = "no runner has claimed it" + (f" (refused: {state['refusal']})" if state["refusal"] else "")
        elif state["runner"]:
            said[row.id] = f"{state['runner']} (done)"
    return said


def not_cancellable(store: Store, row: Any) -> NotCancellable:
    """Why an execution cannot be cancelled from here (it ended, or a kernel drives it)."""
    if row.status not in UNFINISHED:
        return NotCancellable(f"{row.key!r} ({row.id[:12]}) is {row.status}: there is nothing to cancel")
    if lease_held(row):
        return NotCancellable(
            f"{row.key!r} ({row.id[:12]}) is driven by {describe_owner(row.lease_owner)}, not by a runner: "
            f"cancel it there (%durable_cancel {row.key}, or its widget's Cancel button)"
        )
    return NotCancellable(f"{row.key!r} ({row.id[:12]}) is not running: nobody drives it, there is nothing to cancel")


def is_detached(run: Run) -> bool:
    return bool(getattr(run, "detached", False))
