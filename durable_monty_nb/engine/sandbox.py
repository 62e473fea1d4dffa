"""The process-wide Monty worker pool and the session settings every execution uses."""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import pydantic_monty
from pydantic_monty import Monty, MontySession

from .. import cpus

MONTY_VERSION = pydantic_monty.__version__
# Every external call, future resolution and name lookup counts as a suspension; the default
# limit (1000) would stop any real fan-out. The limit cannot be switched off, so make it huge.
SUSPENSION_LIMIT = 2**62
LIMITS: dict[str, Any] = {"max_suspensions": SUSPENSION_LIMIT}
# Sleeps come to the host, which turns them into durable timers.
OS_POLICY: dict[str, Any] = {"sleep": "call_host"}
PRELUDE = "from asyncio import gather"
SCRIPT_NAME = "workflow.py"

_pool: Monty | None = None
_older_threads: set[int] = set()  # this process's threads from before the pool (none of them the pool's)
POOL_THREAD = "tokio-rt-worker"  # the name of the pool's I/O threads in this process (pydantic-monty 1.4)
_lock = threading.Lock()


def pool() -> Monty:
    """The shared pool; each running execution holds one worker process of it."""
    global _pool, _older_threads
    with _lock:
        if _pool is None:
            _older_threads = set(cpus.threads_of(os.getpid()))
            _pool = Monty(min_processes=1, max_processes=256)
            _pool.__enter__()
            atexit.register(close_pool)
        return _pool


def close_pool() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            try:
                _pool.__exit__(None, None, None)
            finally:
                _pool = None


def warm() -> None:
    """Start the pool and run its first worker once (``warming`` does it at ``%load_ext``): the
    first run then finds a worker process that has started and fed code already, instead of
    paying for it (10 to 15 ms here). A failure is left for that run to meet and report."""
    with contextlib.suppress(Exception):
        session = open_session()
        try:
            session.feed_start(PRELUDE)
        finally:
            close_session(session)


def open_session() -> MontySession:
    session = pool().checkout(limits=LIMITS, os_policy=OS_POLICY, script_name=SCRIPT_NAME)
    session.__enter__()
    return session


def close_session(session: MontySession | None) -> None:
    if session is not None:
        with contextlib.suppress(Exception):  # a crashed worker is already gone
            session.__exit__(None, None, None)


def share_cpu(session: MontySession, share: bool = True) -> Callable[[], None] | None:
    """Put the calling thread (a driver), the pool's I/O threads and the session's worker
    process on one CPU, for as long as the driver runs; return what gives them every CPU back
    (None: nothing pinned). They take turns, never run at once: see :mod:`..cpus`."""
    pid = session.worker_pid
    if pid is None:
        return None
    release = None
    if share:
        io_threads = [t for t in cpus.threads_of(os.getpid(), POOL_THREAD) if t not in _older_threads]
        release = cpus.share_one_cpu([threading.get_native_id(), *io_threads, *cpus.threads_of(pid)])
    if release is None:  # not sharing: a worker the pool spawned from a pinned thread gets every CPU
        cpus.unpin(cpus.threads_of(pid))
    return release
