"""Calls as tasks on a ``distributed`` cluster (``pip install 'durable-monty-nb[dask]'``).

```bash
dask scheduler                       # prints its address, e.g. tcp://10.0.0.5:8786
dask worker tcp://10.0.0.5:8786      # on each machine, with DURABLE_MONTY_KEY set
```

Each attempt is one task whose key is the attempt's durable id, submitted in batches (one
``client.map`` per batch) and marked ``fire_and_forget``: the scheduler runs it even when the
kernel that submitted it is gone. The worker runs :func:`run_task`, which writes the signed
outcome to the store and returns the same short message as the task's result. A done
callback per future hands finished futures to one thread of the executor, which gathers
their messages in batches (one round trip for many results) and reports them.

On resume, one call on the scheduler registers this client's interest in the attempts it
still knows (queued, running or finished) and returns their states: those are waited for;
the others are lost (the driver looks for their outcome in the store before running them
again). That call runs a small function on the scheduler, sent by value: the scheduler needs
``distributed.scheduler.pickle`` (on by default), not this package. Futures cancelled because
the connection to the scheduler dropped are followed the same way once it is back: tasks that
survived are not run twice.

A worker commits the outcomes of tasks whose message reaches the driver in batches, a little
after each task ends (``worker.WRITE_LINGER``); a task the scheduler has forgotten may have
finished while no driver listened, its outcome still held. So before the executor reports any
attempt lost, every worker commits what it holds: such an attempt is found in the store, never
run again.

A worker that dies mid-call is Dask's to handle: the scheduler runs the task (the same
attempt) on another worker, and fails it with ``KilledWorker`` after
``distributed.scheduler.allowed-failures`` deaths, a failure the function's retry policy sees.

Without an address, one ``LocalCluster`` of worker processes is started per process and
shared by every run; calls in flight on it die with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ExecutorUnavailable, TamperedDataError
from . import RunContext
from .base import Done, ErrorInfo, Health, Outcome, Task, WatchedExecutor
from .record import outcome_from_wire
from .worker import failure_message, flush_writers, make_payload, run_attempt, worker_name

ADDRESS_ENV = "DURABLE_MONTY_DASK_ADDRESS"
CONNECT_SECONDS = 5.0
POLL_SECONDS = 1.0  # how often the scheduler is asked which attempts run, while some are in flight
GATHER_BATCH = 2000
GATHER_WAIT = 0.02
"""Seconds the watcher waits after a future finishes for others in flight to gather with it (at
most until all of them finished, so a lone awaited call is gathered at once): a gather is a round
trip to the workers that hold the results, and gathering each result as it came cost a fan-out of
10,000 trivial calls more than their run."""
CONNECTION_LOST = "scheduler-connection-lost"

_lock = threading.Lock()
_clients: dict[str | None, Any] = {}  # one Client per address (None: the local cluster)
_cluster: Any = None


@dataclass(frozen=True)
class Dask:
    """The Dask backend: the scheduler's ``address`` (default ``$DURABLE_MONTY_DASK_ADDRESS``).

    Without one, a local cluster of ``os.cpu_count()`` single-threaded worker processes is
    started once per process.
    """

    address: str | None = field(default_factory=lambda: os.environ.get(ADDRESS_ENV) or None)
    name: str = "dask"
    remote = True

    def client(self) -> Any:
        """The process-wide client of this address (connected, or started, on first use)."""
        return client_for(self.address)

    def check(self) -> None:
        try:
            self.client()
        except Exception as exc:
            if self.address is None:
                raise ExecutorUnavailable(
                    f"cannot start a local Dask cluster for the dask executor ({type(exc).__name__}: {exc}). "
                    f"Start `dask scheduler` and `dask worker ADDRESS`, then set DurableMagics.dask_address; "
                    f"nothing was dispatched."
                ) from None
            raise ExecutorUnavailable(
                f"cannot reach the Dask scheduler at {self.address} for the dask executor "
                f"({type(exc).__name__}: {exc}). Start `dask scheduler` and `dask worker {self.address}`, "
                f"or fix DurableMagics.dask_address; nothing was dispatched."
            ) from None

    def open(self, run: RunContext) -> DaskExecutor:
        return DaskExecutor(self, run)


def client_for(address: str | None) -> Any:
    """The cached ``distributed.Client`` of ``address``; a closed one is replaced."""
    global _cluster
    from distributed import Client, LocalCluster

    with _lock:
        client = _clients.get(address)
        if client is not None and client.status not in ("closing", "closed"):
            return client
        if address is None:
            if _cluster is None or _cluster.status.name in ("closing", "closed", "failed"):
                workers = os.cpu_count() or 1
                _cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # health checks: not port 8787
                )
                print(
                    f"durable-monty-nb: started a local Dask cluster of {workers} worker processes "
                    f"({_cluster.scheduler_address}). Calls in flight on it die with this process; "
                    f"set DurableMagics.dask_address (or ${ADDRESS_ENV}) to a cluster that outlives it.",
                    file=sys.stderr,
                    flush=True,
                )
            client = Client(_cluster, set_as_default=False)
        else:
            client = Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
        _clients[address] = client
        return client


def close_clients() -> None:
    """Close the cached clients and the local cluster of this process (the next run starts afresh)."""
    global _cluster
    with _lock:
        clients, cluster = list(_clients.values()), _cluster
        _clients.clear()
        _cluster = None
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.close()


class DaskExecutor(WatchedExecutor):
    """The executor of one execution on a Dask cluster; see the module docstring."""

    name = "dask"
    remote = True
    durable = True

    def __init__(self, backend: Dask, run: RunContext) -> None:
        client = backend.client()
        address = backend.address or client.scheduler.address
        super().__init__(
            run,
            Health(
                f"the Dask scheduler at {address}",
                f"no Dask worker is connected to {address}: start one with: dask worker {address}",
            ),
        )
        self.backend = backend
        self.client = client
        self.address = address
        self._futures: dict[str, Any] = {}  # futures of the attempts in flight, referenced until they report
        self._orphans: list[Task] = []  # futures cancelled when the connection dropped: follow again
        self._finished: queue.SimpleQueue[Any] = queue.SimpleQueue()  # futures from done callbacks
        self._running = 0
        self._last_poll = 0.0

    # -- the Executor protocol -----------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        with self._lock:
            running = min(self._running, len(self._tasks))
            return len(self._tasks) - running, running

    def attach(self, tasks: Sequence[Task], done: Done) -> list[Task]:
        self._expect(tasks, done)
        try:
            lost = self._follow(list(tasks))
        except Exception as exc:  # the scheduler is unreachable: follow them once it is back
            self._health.unreachable(exc)
            with self._lock:
                self._orphans.extend(tasks)
            lost = []
        with self._lock:
            for task in lost:
                self._tasks.pop(task.id, None)
        self._watch()
        return lost

    def withdraw(self, tasks: Sequence[Task]) -> list[Task]:
        """Take back the tasks no worker executes yet: they never run. First each worker, in one
        step of its event loop, forgets those that only wait in its own queue (Dask gives a worker
        a little more than its threads; the scheduler counts them as processing) and names them;
        then the scheduler, in one step of its own, releases those and the ones it never sent to a
        worker. A task a worker executes, ran, or has not been told of yet (the scheduler's
        message on its way) goes on and writes its outcome to the store; so does one the
        scheduler has not heard of yet (a batch it is still reading)."""
        client = self._connected()
        with self._lock:
            held = set(self._tasks)  # only the attempts this executor has
        keys = [task.id for task in tasks if task.id in held]
        if not keys:
            return []
        try:
            by_worker = client.run(_forget_queued, keys=keys)
        except Exception:
            return []  # the scheduler or a worker is away: nothing is withdrawn
        forgotten = {key: worker for worker, found in by_worker.items() for key in found}
        try:
            released = set(client.run_on_scheduler(_release_unstarted, keys=keys, forgotten=forgotten))
        except Exception:  # the scheduler went away: what the workers forgot cannot run there
            released = set(forgotten)
        taken = [task for task in tasks if task.id in released]
        with self._lock:
            for task in taken:
                self._tasks.pop(task.id, None)
                self._futures.pop(task.id, None)
        return taken

    def cancel(self, tasks: Sequence[Task]) -> None:
        """Release the tasks on the scheduler: queued ones never run; a running one runs out
        on its worker (Dask cannot interrupt a thread) and its result is dropped."""
        with self._lock:
            futures = [f for task in tasks if (f := self._futures.pop(task.id, None)) is not None]
            for task in tasks:
                self._tasks.pop(task.id, None)
        if futures:
            with contextlib.suppress(Exception):
                self._connected().cancel(futures, force=True)

    def shutdown(self) -> None:
        """Stop the watcher and let go of the futures: the tasks go on (fire and forget)."""
        self._closed.set()
        self._finished.put(None)
        with self._lock:
            self._futures.clear()

    # -- submitting ----------------------------------------------------------------------------

    def _send(self, tasks: list[Task]) -> None:
        from distributed import fire_and_forget

        if not tasks:
            return
        run = self.run
        payloads = [make_payload(task, run.store_url, run.signer, self.name) for task in tasks]
        try:
            client = self._connected()
            futures = client.map(run_task, payloads, key=[task.id for task in tasks], pure=False)
            fire_and_forget(futures)
        except Exception as exc:
            with self._lock:
                self._unsent.extend(tasks)
            self._health.unreachable(exc)
            return
        self._track(tasks, futures)

    def _track(self, tasks: Sequence[Task], futures: Sequence[Any]) -> None:
        with self._lock:
            for task, future in zip(tasks, futures, strict=True):
                self._futures[task.id] = future
        put = self._finished.put
        for future in futures:
            future.add_done_callback(put)

    def _follow(self, tasks: list[Task]) -> list[Task]:
        """Follow attempts the scheduler may still have; return those it does not know."""
        from distributed import Future

        if not tasks:
            return []
        client = self._connected()
        keys = [task.id for task in tasks]
        # The futures exist before the scheduler reports on their keys (at once, for finished ones).
        # Older distributed releases (2024.1 among them) have a new future tell the scheduler its
        # client wants the key, which makes an unknown key known: `_desire_known_keys` does that
        # for the known ones only.
        quiet = {"inform": False} if "inform" in inspect.signature(Future).parameters else {}
        futures = [Future(key, client, **quiet) for key in keys]
        states = client.run_on_scheduler(_desire_known_keys, keys=keys, client_id=client.id)
        known, lost = [], []
        for task, future in zip(tasks, futures, strict=True):
            if states.get(task.id) is None:
                lost.append(task)
                future.release()
            else:
                known.append((task, future))
                if states[task.id] == "processing":
                    task.started_at = task.started_at or time.time()
        self._track([task for task, _ in known], [future for _, future in known])
        if lost:  # finished and forgotten, its outcome perhaps still held for a batched commit
            with contextlib.suppress(Exception):  # a worker that died took its outcomes with it
                client.run(_commit_held_outcomes, on_error="ignore")
        return lost

    def _connected(self) -> Any:
        """The client, replaced by a new one when it closed (the scheduler was away too long)."""
        if self.client.status in ("closing", "closed"):
            self.client = self.backend.client()
        return self.client

    # -- the watcher thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                first = self._finished.get(timeout=POLL_SECONDS)
            except queue.Empty:
                first = None
            batch = [] if first is None else [first]
            if first is not None:  # others in flight may finish meanwhile: one gather for them all
                until = time.monotonic() + GATHER_WAIT
                with contextlib.suppress(queue.Empty):
                    while len(batch) < min(GATHER_BATCH, len(self._futures)):  # never waits for a lone call
                        batch.append(self._finished.get(timeout=max(until - time.monotonic(), 0)))
            batch = [future for future in batch if future is not None]
            if self._closed.is_set():
                return
            try:
                if batch:
                    self._deliver(batch)
                if time.monotonic() - self._last_poll >= POLL_SECONDS:
                    self._poll()
            except Exception as exc:  # the scheduler went away meanwhile: try again in a while
                with self._lock:
                    for future in batch:
                        if self._futures.get(future.key) is future:  # not reported yet
                            self._finished.put(future)
                self._health.unreachable(exc)
                self._closed.wait(POLL_SECONDS)

    def _deliver(self, futures: list[Any]) -> None:
        """Report the attempts of finished futures: results gathered in one round trip."""
        finished, other = [], []
        for future in futures:
            (finished if future.status == "finished" else other).append(future)
        if finished:
            try:
                messages = self.client.gather(finished, errors="raise")
            except Exception:  # one of them changed state meanwhile: one by one
                other += finished
            else:
                for future, message in zip(finished, messages, strict=True):
                    self._report(future.key, self._outcome(future.key, message))
        for future in other:
            self._settle(future)

    def _settle(self, future: Any) -> None:
        key = future.key
        with self._lock:
            task = self._tasks.get(key)
        if task is None:
            return
        status = future.status
        if status == "finished":
            self._report(key, self._outcome(key, future.result()))
        elif status == "error":
            exc = future.exception()
            if isinstance(exc, AttemptNotRun):
                self._report(key, self._outcome(key, exc.message))
                return
            text = "".join(traceback.format_exception(type(exc), exc, future.traceback())).rstrip()
            outcome = Outcome(task.call_id, task.attempt, False, error=ErrorInfo.of(exc, text))
            outcome.finished_at, outcome.worker = time.time(), task.worker
            self._report(key, outcome)
        elif status == "cancelled":
            # Read without a round trip: the client may be closed by now.
            reason = getattr(getattr(future, "_state", None), "exception", None)
            reason = getattr(reason, "reason", None) or ""
            if reason == CONNECTION_LOST:
                with self._lock:
                    self._futures.pop(key, None)
                    self._orphans.append(task)
                self._health.unreachable(ConnectionError("the connection to the scheduler was lost"))
            else:
                why = f"the Dask scheduler at {self.address} no longer has it ({reason or 'cancelled'})"
                self._report(key, Outcome.lost_attempt(task, why))
        else:  # pending again (its result was lost with a worker): wait for the new run
            future.add_done_callback(self._finished.put)

    def _outcome(self, key: str, message: dict[str, Any]) -> Outcome:
        try:
            return outcome_from_wire(message, self.run.signer)
        except TamperedDataError as exc:  # a forged result: the attempt fails, loudly
            task = self._tasks.get(key)
            call_id, attempt = (task.call_id, task.attempt) if task else (message.get("call_id", 0), 0)
            return Outcome(call_id, attempt, False, error=ErrorInfo.of(exc, f"TamperedDataError: {exc}"))

    def _forget(self, task_id: str) -> None:
        self._futures.pop(task_id, None)

    def _poll(self) -> None:
        """At most once a second, with attempts in flight: which run where, and is anyone there."""
        self._last_poll = time.monotonic()
        with self._lock:
            unsent, self._unsent = self._unsent, []
            orphans, self._orphans = self._orphans, []
            busy = bool(self._tasks)
        if not (busy or unsent or orphans):
            return
        try:
            client = self._connected()
            if client.status != "running":
                raise ConnectionError(f"its client is {client.status}")
            processing = client.processing()
            if orphans:
                for task in self._follow(orphans):
                    why = f"the Dask scheduler at {self.address} lost it while the connection was down"
                    self._report(task.id, Outcome.lost_attempt(task, why))
                orphans = []
            self._send(unsent)  # on failure, they are unsent again
            unsent = []
        finally:
            if unsent or orphans:
                with self._lock:
                    self._unsent[:0], self._orphans[:0] = unsent, orphans
        if not self._unsent:
            self._health.reachable()
        self._count_running(processing)

    def _count_running(self, processing: dict[str, list[str]]) -> None:
        now = time.time()
        with self._lock:
            tasks = self._tasks
            running = 0
            for worker, keys in processing.items():
                for key in keys:
                    task = tasks.get(key)
                    if task is not None:
                        running += 1
                        if not task.started_at:
                            task.started_at, task.worker = now, worker
            self._running = running
            waiting = len(tasks) - running
        # the scheduler lists every worker, idle or not
        self._health.workers(waiting=waiting > 0, present=bool(processing))


def _forget_queued(dask_worker: Any, keys: list[str]) -> list[str]:
    """On a worker (``client.run``, a plain function: one step of its event loop, so no task
    starts meanwhile): of ``keys``, forget those waiting in its queue, as if the scheduler had
    freed them; they never run here. Returns them."""
    from distributed.worker_state_machine import FreeKeysEvent

    wanted = set(keys)
    queued = [str(key) for key, ts in dask_worker.state.tasks.items() if key in wanted and ts.state in QUEUED]
    if queued:
        dask_worker.handle_stimulus(FreeKeysEvent(keys=queued, stimulus_id=f"durable-withdraw-{time.time()}"))
    return queued


QUEUED = ("waiting", "ready", "constrained")  # a worker's states of a task before it executes


class AttemptNotRun(RuntimeError):
    """Raised by :func:`run_task` for an attempt that could not run at all: the future errs
    with this exception, which carries the (unsigned) failure message for the driver."""

    def __init__(self, text: str, message: dict[str, Any]) -> None:
        super().__init__(text, message)
        self.message = message

    def __str__(self) -> str:
        return str(self.args[0])


def run_task(payload: dict[str, Any]) -> dict[str, Any]:
    """The Dask task of one attempt (runs on the worker): run it, write the outcome, return its message."""
    name = _dask_worker_name()
    try:
        message = run_attempt(payload, worker=name, write_behind=True)
    except Exception as exc:  # the attempt could not run at all (wrong key, store unreachable)
        message = failure_message(payload, exc, name)
    if "error" in message:
        raise AttemptNotRun(message["error"]["message"], message)
    return message


async def _commit_held_outcomes() -> None:
    """On each worker (``client.run``): commit the outcomes its write-behind thread holds, off the
    worker's event loop."""
    await asyncio.to_thread(flush_writers, FLUSH_SECONDS)


FLUSH_SECONDS = 10.0  # at most this long for a worker's held outcomes to commit (a slow store)


def _dask_worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return worker_name()


def _scheduler_function() -> Any:
    """The function :meth:`DaskExecutor._follow` runs on the scheduler, defined here so that it
    travels by value (the scheduler need not have this package installed)."""

    def desire_known_keys(dask_scheduler: Any, keys: list[str], client_id: str) -> dict[str, str | None]:
        # The state of each key (None: unknown), and client_id now wants the known ones: both in
        # one step of the scheduler's event loop, so a known task cannot be forgotten in between.
        tasks = dask_scheduler.tasks
        states = {key: (tasks[key].state if key in tasks else None) for key in keys}
        known = [key for key, state in states.items() if state is not None]
        if known:
            dask_scheduler.client_desires_keys(keys=known, client=client_id)
        return states

    return desire_known_keys


_desire_known_keys = _scheduler_function()


def _release_function() -> Any:
    """The function :meth:`DaskExecutor.withdraw` runs on the scheduler (by value, as above)."""

    def release_unstarted(dask_scheduler: Any, keys: list[str], forgotten: dict[str, str]) -> list[str]:
        # Keys no worker was sent (waiting or queued on the scheduler), then those the worker they
        # are processing on forgot just before (``forgotten``: key -> that worker): every client
        # that wants them lets go, so they are forgotten here too. In that order: releasing a
        # processing task frees its worker's slot, which the scheduler fills at once from its
        # queue. Unknown keys (their graph not read yet), and processing ones their worker did
        # not forget (it executes them, or the scheduler's message is on its way, or they moved to
        # another worker) are left alone.
        tasks = dask_scheduler.tasks
        unsent = [
            key for key in keys if key in tasks and tasks[key].state in ("released", "waiting", "queued", "no-worker")
        ]
        held = []
        for key, worker in forgotten.items():
            ts = tasks.get(key)
            on = None if ts is None or ts.state != "processing" else ts.processing_on
            if on is not None and on.address == worker:
                held.append(key)
        for key in [*unsent, *held]:
            ts = tasks.get(key)
            for client in [cs.client_key for cs in (ts.who_wants if ts is not None else None) or ()]:
                dask_scheduler.client_releases_keys(keys=[key], client=client)
        return [*unsent, *held]

    return release_unstarted


_release_unstarted = _release_function()
