"""Calls as RQ jobs on plain ``rq worker`` processes (``pip install 'durable-monty-nb[rq]'``).

```bash
rq worker durable-monty --url redis://127.0.0.1:6379/0
```

Each attempt is one job whose id is the attempt's durable id, enqueued in batches
(``enqueue_many``) without a job timeout. The worker runs :func:`run_job`: it writes the
signed outcome to the store, then pushes a short message to a Redis list of the execution,
which one watcher thread of the driver's process reads (``BLPOP``): no polling per call, and
no result that depends on RQ's ``result_ttl``.

While a job runs, its worker keeps a Redis key alive (refreshed every few seconds). On
resume, an attempt whose job is queued or started is waited for (a started job whose key is
not set yet gets ``ALIVE_SECONDS`` to set it: its work horse may still be starting); one whose
job is gone or failed, or whose key stays unset (its worker was killed), is lost. So is a job a
worker took off the queue and died with before its work horse said it started (RQ keeps it
``queued`` in its intermediate list for minutes): out of the queue, with no alive key, for
``ALIVE_SECONDS``. The driver
then looks for the attempt's outcome in the store (a worker that wrote it and died before it
said so) and runs the call again only when there is none.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import defaults
from ..errors import ExecutorUnavailable, TamperedDataError
from . import RunContext
from .base import Done, Health, Outcome, Task, WatchedExecutor
from .record import outcome_from_wire
from .worker import failure_message, make_payload, run_attempt, worker_name

URL_ENV = "DURABLE_MONTY_RQ_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
PREFIX = "durable-monty"
ALIVE_SECONDS = 10  # a running job's key lives this long unless its worker refreshes it
NOTIFY_TTL = 7 * 24 * 3600  # messages of a dead kernel's execution wait this long for a resume
RESULT_TTL = 60  # RQ's own copy of the (small) return value: the store has the outcome
FAILURE_TTL = 7 * 24 * 3600
WATCH_SECONDS = 1.0
QUEUE_CHECK_SECONDS = 5.0  # how often queued jobs are checked for having vanished


def notify_key(execution_id: str) -> str:
    return f"{PREFIX}:done:{execution_id}"


def alive_key(attempt_id: str) -> str:
    return f"{PREFIX}:alive:{attempt_id}"


@dataclass(frozen=True)
class RQ:
    """The RQ backend: ``url`` of Redis (default ``$DURABLE_MONTY_RQ_URL`` or the local server), ``queue``."""

    url: str = field(default_factory=lambda: os.environ.get(URL_ENV) or DEFAULT_URL)
    queue: str = defaults.RQ_QUEUE
    name: str = "rq"
    remote = True

    def connection(self) -> Any:
        from redis import Redis

        return Redis.from_url(self.url, socket_connect_timeout=5, health_check_interval=30)

    def check(self) -> None:
        try:
            self.connection().ping()
        except Exception as exc:
            raise ExecutorUnavailable(
                f"cannot reach Redis at {_public(self.url)} for the rq executor ({type(exc).__name__}: {exc}). "
                f"Start Redis or fix DurableMagics.rq_url; nothing was dispatched."
            ) from None

    def open(self, run: RunContext) -> RQExecutor:
        return RQExecutor(self, run)


class RQExecutor(WatchedExecutor):
    """The executor of one execution on RQ; see the module docstring."""

    name = "rq"
    remote = True
    durable = True

    def __init__(self, backend: RQ, run: RunContext) -> None:
        from rq import Queue

        url, queue_name = _public(backend.url), backend.queue
        super().__init__(
            run,
            Health(
                f"Redis at {url}",
                f"no worker is listening on queue {queue_name} ({url}): start one with: "
                f"rq worker {queue_name} --url {url}",
            ),
        )
        self.backend = backend
        self.redis = backend.connection()
        self.queue = Queue(backend.queue, connection=self.redis)
        self._notify = notify_key(run.execution_id)
        self._last_check = 0.0
        self._last_queue_check = time.monotonic()
        # Attempts a worker had taken when this process attached, whose job had not yet set its
        # alive key (a work horse starting up): given ALIVE_SECONDS to show it, by id.
        self._unconfirmed: dict[str, float] = {}
        # Waiting attempts whose job was seen out of the queue with no alive key: a worker took
        # it and may have died before starting it. By id: when that was first seen.
        self._taken_unseen: dict[str, float] = {}

    # -- the Executor protocol -----------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        with self._lock:
            running = sum(1 for task in self._tasks.values() if task.started_at)
            return len(self._tasks) - running, running

    def attach(self, tasks: Sequence[Task], done: Done) -> list[Task]:
        from rq.job import Job

        with self._lock:
            self._done = done
        jobs = Job.fetch_many([task.id for task in tasks], connection=self.redis)
        with self.redis.pipeline() as pipe:
            for task in tasks:
                pipe.exists(alive_key(task.id))
            alive = pipe.execute()
        lost = []
        for task, job, beating in zip(tasks, jobs, alive, strict=True):
            status = job.get_status(refresh=False) if job is not None else None
            if status in ("queued", "deferred", "scheduled", "started"):
                with self._lock:
                    if status == "started":
                        task.started_at = time.time()
                        if not beating:  # taken by a worker whose job has not said it is alive yet
                            self._unconfirmed[task.id] = time.monotonic() + ALIVE_SECONDS
                    self._tasks[task.id] = task
            else:  # gone (flushed), failed, stopped, finished (the driver looks for its outcome in the store)
                lost.append(task)
        self._watch()
        return lost

    def withdraw(self, tasks: Sequence[Task]) -> list[Task]:
        """Take the jobs still in the queue out of it (and drop the unsent ones): none of them
        will start. Taking a job out is one atomic ``LREM``, so a job a worker popped a moment
        before is not among them: it runs out and writes its outcome to the store. Returns the
        attempts withdrawn."""
        from redis.exceptions import RedisError
        from rq.exceptions import InvalidJobOperation
        from rq.job import Job

        with self._lock:
            unsent = {task.id for task in self._unsent}
            self._unsent = [task for task in self._unsent if task.id not in {t.id for t in tasks}]
        taken = [task for task in tasks if task.id in unsent]
        sent = [task for task in tasks if task.id not in unsent]
        try:
            if sent:
                with self.redis.pipeline(transaction=False) as pipe:
                    for task in sent:
                        self.queue.remove(task.id, pipeline=pipe)
                    removed = [task for task, count in zip(sent, pipe.execute(), strict=True) if count]
                taken += removed
                for job in Job.fetch_many([task.id for task in removed], connection=self.redis):
                    if job is not None:  # shown as canceled by RQ's own tools
                        with contextlib.suppress(InvalidJobOperation):
                            job.cancel()
        except RedisError:
            pass  # Redis is away: the jobs not withdrawn yet are followed as before
        with self._lock:
            for task in taken:
                self._tasks.pop(task.id, None)
        return taken

    def cancel(self, tasks: Sequence[Task]) -> None:
        """Queued jobs are cancelled; a running one is stopped (its work horse is killed)."""
        from redis.exceptions import RedisError
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job

        with self._lock:
            for task in tasks:
                self._tasks.pop(task.id, None)
        for task in tasks:
            try:
                job = Job.fetch(task.id, connection=self.redis)
                if job.get_status() == "started":
                    send_stop_job_command(self.redis, task.id)
                else:
                    job.cancel()
            except (NoSuchJobError, InvalidJobOperation, RedisError):
                pass  # finished meanwhile, or Redis is away: its outcome is ignored either way

    def shutdown(self) -> None:
        self._closed.set()

    def _forget(self, task_id: str) -> None:
        self._unconfirmed.pop(task_id, None)
        self._taken_unseen.pop(task_id, None)

    # -- enqueueing ------------------------------------------------------------------------------

    def _send(self, tasks: list[Task]) -> None:
        from redis.exceptions import RedisError

        if not tasks:
            return
        run = self.run
        data = [
            self.queue.prepare_data(
                run_job,
                args=(make_payload(task, run.store_url, run.signer, self.name, notify=self._notify),),
                job_id=task.id,
                timeout=-1,
                result_ttl=RESULT_TTL,
                failure_ttl=FAILURE_TTL,
                description=f"{task.function}() · call {task.call_id} of {run.key} (attempt {task.attempt})",
            )
            for task in tasks
        ]
        try:
            self.queue.enqueue_many(data)
        except RedisError as exc:
            with self._lock:
                self._unsent.extend(tasks)
            self._health.unreachable(exc)
            return
        self._health.reachable()

    # -- the watcher thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        from redis.exceptions import RedisError

        while not self._closed.is_set():
            try:
                if self._unsent:
                    with self._lock:
                        unsent, self._unsent = self._unsent, []
                    self._send(unsent)
                first = self.redis.blpop([self._notify], timeout=WATCH_SECONDS)
                messages = [first[1]] if first else []
                if first:
                    messages += self.redis.lpop(self._notify, 1000) or []
                if not self._unsent:
                    self._health.reachable()
                for raw in messages:
                    self._deliver(json.loads(raw))
                if time.monotonic() - self._last_check >= WATCH_SECONDS:
                    self._check()
            except RedisError as exc:
                self._health.unreachable(exc)
                self._closed.wait(WATCH_SECONDS)

    def _deliver(self, message: dict[str, Any]) -> None:
        if "started" in message:
            with self._lock:
                task = self._tasks.get(message["started"])
            if task is not None:
                task.started_at, task.worker = time.time(), str(message.get("worker", ""))
            return
        try:
            outcome = outcome_from_wire(message, self.run.signer)
        except TamperedDataError:
            return  # a forged message: the attempt's real outcome is still to come (or in the store)
        self._report(message.get("id", ""), outcome)

    def _check(self) -> None:
        """Every second or so: lost jobs (their worker died), and whether anyone listens; every
        few seconds, queued jobs that vanished (Redis flushed, a job deleted)."""
        from rq import Worker

        now = self._last_check = time.monotonic()
        with self._lock:
            started = [task for task in self._tasks.values() if task.started_at]
            waiting = len(self._tasks) - len(started)
        if waiting and now - self._last_queue_check >= QUEUE_CHECK_SECONDS:
            self._last_queue_check = now
            self._find_vanished()
        if started:
            with self.redis.pipeline() as pipe:
                for task in started:
                    pipe.exists(alive_key(task.id))
                alive = pipe.execute()
            for task, beating in zip(started, alive, strict=True):
                grace = self._unconfirmed.get(task.id)
                if beating:
                    if grace is not None:
                        with self._lock:
                            self._unconfirmed.pop(task.id, None)
                elif (grace is None or now >= grace) and not self.redis.exists(self._notify):
                    # not alive, and no outcome on its way either
                    self._report(task.id, Outcome.lost_attempt(task, f"its worker {task.worker} stopped"))
        self._health.workers(waiting=waiting > 0, present=not waiting or bool(Worker.all(queue=self.queue)))

    def _find_vanished(self) -> None:
        """Waiting attempts that will never run, so are lost: their job is gone from Redis, or a
        worker took it off the queue and has shown no sign of running it for ``ALIVE_SECONDS``
        (killed between RQ's dequeue and its work horse starting the job)."""
        from rq.job import Job

        with self._lock:
            unsent = {task.id for task in self._unsent}  # waiting for Redis to come back, not lost
            queued = [task for task in self._tasks.values() if not task.started_at and task.id not in unsent]
        with self.redis.pipeline() as pipe:
            pipe.lrange(self.queue.key, 0, -1)
            for task in queued:
                pipe.exists(Job.key_for(task.id))
                pipe.exists(alive_key(task.id))
            in_queue, *replies = pipe.execute()
        in_queue = {raw.decode() if isinstance(raw, bytes) else raw for raw in in_queue}
        now = time.monotonic()
        gone, taken = [], []
        for task, there, beating in zip(queued, replies[::2], replies[1::2], strict=True):
            if not there:
                gone.append(task)
            elif task.id in in_queue or beating:
                self._taken_unseen.pop(task.id, None)
            elif now - self._taken_unseen.setdefault(task.id, now) >= ALIVE_SECONDS:
                taken.append(task)
        if (gone or taken) and not self.redis.exists(self._notify):  # no outcome on its way either
            for task in gone:
                self._report(task.id, Outcome.lost_attempt(task, "its job vanished from Redis before it ran"))
            for task in taken:
                self._report(task.id, Outcome.lost_attempt(task, "the worker that took its job stopped before it ran"))


def run_job(payload: dict[str, Any]) -> str:
    """The RQ job of one attempt (runs on the worker): heartbeat, run, write, notify."""
    from rq import get_current_job

    job = get_current_job()
    redis = job.connection if job is not None else None
    name = f"{job.worker_name}:{os.getpid()}" if job is not None and job.worker_name else worker_name()
    task_id = Task(payload["execution_id"], payload["call_id"], payload["attempt"], payload["function"]).id
    stop = threading.Event()
    if redis is not None:
        redis.set(alive_key(task_id), name, ex=ALIVE_SECONDS)
        redis.rpush(payload["notify"], json.dumps({"started": task_id, "worker": name}))
        threading.Thread(target=_heartbeat, args=(redis, alive_key(task_id), name, stop), daemon=True).start()
    try:
        message = run_attempt(payload, worker=name)
    except Exception as exc:  # the attempt could not run at all (wrong key, store unreachable)
        message = failure_message(payload, exc, name)
    finally:
        stop.set()
    if redis is not None:
        with redis.pipeline() as pipe:
            pipe.rpush(payload["notify"], json.dumps(message))
            pipe.expire(payload["notify"], NOTIFY_TTL)
            pipe.delete(alive_key(task_id))
            pipe.execute()
    if "error" in message:
        raise RuntimeError(message["error"]["message"])
    return message.get("record", {}).get("status", "done")


def _heartbeat(redis: Any, key: str, name: str, stop: threading.Event) -> None:
    while not stop.wait(ALIVE_SECONDS / 3):
        with contextlib.suppress(Exception):
            redis.set(key, name, ex=ALIVE_SECONDS)


def _public(url: str) -> str:
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):
        return make_url(url).render_as_string(hide_password=True)
    return url
