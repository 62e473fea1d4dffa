"""The worker side of remote executors: run one attempt from its signed payload.

Plain ``rq worker`` and ``dask worker`` processes call :func:`run_attempt` (through the small
job functions of :mod:`.rq` and :mod:`.dask`) with nothing more than this package installed
and the store's signing key available (``DURABLE_MONTY_KEY`` or the key file). The function
comes from the store (pickled by value, signed), the arguments from the payload or the
store's blobs, and the outcome goes to the store, signed, before the job ends: a result never
depends on RQ's result TTL or a Dask future staying referenced.

A store URL travels without its password; a worker takes the password from its own
``DURABLE_MONTY_DB`` when that names the same database.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any

from sqlalchemy.engine import make_url

from .. import defaults
from ..errors import StoreError, TamperedDataError
from ..store.signing import KEY_ENV, KEY_FILE_ENV, Signer
from .base import ErrorInfo, Task
from .current import running_call
from .record import AttemptRecord, error_types_text

PAYLOAD_VERSION = 1
DB_ENV = "DURABLE_MONTY_DB"

_lock = threading.Lock()
_stores: dict[str, Any] = {}
_functions: dict[str, Any] = {}
_signer: Signer | None = None


def make_payload(task: Task, store_url: str, signer: Signer, executor: str, **extra: Any) -> dict[str, Any]:
    """The signed description of a task that a worker needs (never the store's password)."""
    payload = {
        "v": PAYLOAD_VERSION,
        "store": _public_url(store_url),
        "execution_id": task.execution_id,
        "call_id": task.call_id,
        "attempt": task.attempt,
        "function": task.function,
        "function_key": task.function_key,
        "args": "" if task.args_blob else task.args,
        "args_blob": task.args_blob,
        "executor": executor,
        **extra,
    }
    payload["sig"] = signer.sign_text("task", _canonical(payload))
    return payload


def run_attempt(payload: dict[str, Any], worker: str | None = None, *, write_behind: bool = False) -> dict[str, Any]:
    """Run the attempt a payload describes; return its wire message (see :func:`wire`).

    Raises TamperedDataError when the payload's signature does not match this worker's key:
    such a worker cannot sign an outcome either, so the job itself fails with that message.

    ``write_behind`` (long-lived workers whose message reaches the driver by itself, as Dask's
    futures do): an outcome the message carries whole is written to the store by a background
    thread that commits many at once, instead of one fsync'ed commit before returning. Outcomes
    the driver must read from the store (large results, stored values) are written first.
    """
    signer = worker_signer()
    verify_payload(payload, signer)
    store = _store(payload["store"])
    task_id = Task(payload["execution_id"], payload["call_id"], payload["attempt"], payload["function"]).id
    finished = store.load_attempt(task_id)
    if finished is not None and finished.finished:  # run before (e.g. Dask re-ran it after its worker died)
        return wire(finished)
    record = AttemptRecord(
        task_id,
        payload["execution_id"],
        payload["call_id"],
        payload["attempt"],
        "done",
        payload["executor"],
        worker or worker_name(),
        started_at=time.time(),
    )
    from ..values import ValueCodec

    codec = ValueCodec(store.load_blob)
    try:
        fn = _function(store, payload["function_key"], payload["function"])
        args_text = payload["args"] or store.load_blob(payload["args_blob"]).decode()
        args, kwargs = codec.decode_host(args_text)
        with running_call(store, payload["execution_id"], payload["call_id"], payload["attempt"], payload["function"]):
            value = fn(*args, **kwargs)
            if inspect.iscoroutine(value):
                value = asyncio.run(_awaited(value))
        record.result = codec.encode_text(value, what=f"the result of {payload['function']}()")
    except Exception as exc:
        info = ErrorInfo.of(exc)
        record.status, record.result = "failed", None
        record.error_types, record.error_message, record.traceback = (
            error_types_text(info),
            info.message,
            info.traceback,
        )
    record.finished_at = time.time()
    record.sign(signer)
    message = wire(record)
    if write_behind and "record" in message and not codec.pending_blobs:
        _writer(store).put(record)
    else:
        store.finish_attempts([record], codec.pending_blobs)
    return message


class _Writer:
    """One thread per store of a worker process: commits queued attempt outcomes in batches."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.queue: queue.SimpleQueue[AttemptRecord | None] = queue.SimpleQueue()  # None: commit now
        self.pending = 0
        self.done = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="durable-attempt-writer").start()

    def put(self, record: AttemptRecord) -> None:
        with self.done:
            self.pending += 1
        self.queue.put(record)

    def flush(self, timeout: float = 30.0) -> bool:
        """Commit what is queued now, without the linger, and wait until it is committed."""
        self.queue.put(None)
        with self.done:
            return self.done.wait_for(lambda: self.pending == 0, timeout)

    def _loop(self) -> None:
        while True:
            records = []
            item = self.queue.get()
            until = time.monotonic() + WRITE_LINGER
            with contextlib.suppress(queue.Empty):
                while item is not None:
                    records.append(item)
                    if len(records) >= WRITE_BATCH:
                        break
                    item = self.queue.get(timeout=max(until - time.monotonic(), 0))
            if not records:
                continue
            try:
                self.store.finish_attempts(records, {})
            except Exception:  # the store stays unreachable: the driver has the outcomes from the messages
                logging.getLogger(__name__).exception("durable-monty-nb: %d attempt outcomes not stored", len(records))
            with self.done:
                self.pending -= len(records)
                self.done.notify_all()


WRITE_BATCH = 1000
WRITE_LINGER = 0.05
"""Seconds the writer waits after an outcome for more to commit with it. Each commit is an
fsync, and the workers of a cluster take turns at the store's write lock: committing each
trivial call's outcome as it came cost the workers about as much as running the calls. The
message to the driver does not wait for it (see :func:`run_attempt`)."""
_writers: dict[int, _Writer] = {}


def _writer(store: Any) -> _Writer:
    with _lock:
        found = _writers.get(id(store))
        if found is None:
            found = _writers[id(store)] = _Writer(store)
            if len(_writers) == 1:
                atexit.register(flush_writers)
        return found


def flush_writers(timeout: float = 30.0) -> bool:
    """Commit every outcome this process holds for a batched commit (at exit; and when a driver
    is about to run again an attempt its executor no longer has: the outcome may be here)."""
    return all([writer.flush(timeout) for writer in list(_writers.values())])


def wire(record: AttemptRecord) -> dict[str, Any]:
    """The message that tells the driver an attempt finished: the signed record, or, when its
    result is large, only where to find it (the store)."""
    if record.result is not None and len(record.result) > defaults.INLINE_LIMIT:
        return {"id": record.attempt_id, "call_id": record.call_id, "attempt": record.attempt, "in_store": True}
    return {"id": record.attempt_id, "record": record.to_dict()}


def failure_message(payload: dict[str, Any], exc: BaseException, worker: str) -> dict[str, Any]:
    """An unsigned message for an attempt that could not run at all (wrong key, store unreachable).

    The driver accepts unsigned messages only as failures, never as results.
    """
    info = ErrorInfo.of(exc)
    return {
        "id": Task(payload["execution_id"], payload["call_id"], payload["attempt"], payload["function"]).id,
        "call_id": payload["call_id"],
        "attempt": payload["attempt"],
        "error": {"types": list(info.types), "message": info.message, "traceback": info.traceback},
        "worker": worker,
    }


def verify_payload(payload: dict[str, Any], signer: Signer) -> None:
    if payload.get("v") != PAYLOAD_VERSION:
        raise TamperedDataError(f"{_refused(payload)}; or install the same durable-monty-nb release on both sides")
    body = {k: v for k, v in payload.items() if k != "sig"}
    try:
        signer.verify_text("task", _canonical(body), payload.get("sig"), "a task")
    except TamperedDataError:
        raise TamperedDataError(f"{_refused(payload)}.") from None


def _refused(payload: dict[str, Any]) -> str:
    """Why a task's payload was refused (built only then: it asks for the host's name)."""
    return (
        f"the task of call {payload.get('call_id')} ({payload.get('function')}) sent to worker {worker_name()}: "
        f"its signature does not match this worker's key. Give the worker the kernel's signing key "
        f"({KEY_ENV}, or the key file {KEY_FILE_ENV})"
    )


def worker_signer() -> Signer:
    global _signer
    if _signer is None:
        _signer = Signer()
    return _signer


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _canonical(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def _store(public_url: str) -> Any:
    """The store of a payload, opened once per worker process (and inherited by forked ones)."""
    from ..store.store import Store

    with _lock:
        store = _stores.get(public_url)
        if store is None:
            store = _stores[public_url] = Store(_full_url(public_url))
        elif store.pid != os.getpid():  # an RQ work horse forked from a prepared worker
            store.after_fork()
        return store


def _public_url(url: str) -> str:
    """The store URL as tasks carry it: never with its password."""
    return make_url(url).render_as_string(hide_password=True)


def prepare_store(url: str) -> str:
    """Open the store a worker will serve and warm its statements, before jobs fork (``durable-monty-nb
    worker``): each job then skips opening it, checking its schema and compiling its SQL."""
    from ..store.store import normalize_url

    public = _public_url(normalize_url(url))
    _store(public).prepare_for_workers()
    return public


def _full_url(public_url: str) -> str:
    url = make_url(public_url)
    if url.password != "***":
        return public_url
    local = os.environ.get(DB_ENV)
    if local and "://" in local:
        mine = make_url(local)
        if (mine.host, mine.port, mine.database, mine.username) == (url.host, url.port, url.database, url.username):
            return local
    raise StoreError(
        f"the store {public_url} needs a password, which tasks never carry: set {DB_ENV} on the worker to "
        f"the store's full URL"
    )


def _function(store: Any, key: str, name: str) -> Any:
    """The shipped function ``key`` (verified, unpickled once per worker process)."""
    fn = _functions.get(key)
    if fn is None:
        import cloudpickle

        try:
            data = store.load_function(key)
        except KeyError:
            raise StoreError(f"the function {name!r} (key {key}) is not in the store {store.display_url}") from None
        fn = _functions[key] = cloudpickle.loads(data)
    return fn


async def _awaited(coroutine: Any) -> Any:
    return await coroutine
