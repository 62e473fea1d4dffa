"""A driver on the threads executor runs on one CPU with its Monty worker (they take turns, so
each hand-off is a context switch, not a wake-up of another CPU), while the notebook's calls keep
every CPU, and only one driver of a process shares a CPU at a time (``durable_monty_nb.cpus``).

Real runs on a real SQLite file; the affinities are read from the kernel (``sched_getaffinity``)
while the calls wait on events. Linux with two CPUs or more, as CI's machine.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from procs import wait_until

from durable_monty_nb import Engine, cpus
from durable_monty_nb.engine import sandbox

pytestmark = pytest.mark.skipif(
    not cpus.SUPPORTED or len(os.sched_getaffinity(0)) < 2, reason="CPU affinity needs Linux and two CPUs"
)
WAIT = 30


def affinity(tid: int) -> set[int]:
    return set(os.sched_getaffinity(tid))


def pinned(pid: int) -> bool:
    return any(len(affinity(tid)) == 1 for tid in cpus.threads_of(pid))


def driver_of(key: str) -> threading.Thread:
    (thread,) = [t for t in threading.enumerate() if t.name == f"durable-driver-{key}"]
    return thread


def test_the_driver_shares_one_cpu_with_its_monty_worker_and_the_calls_keep_every_cpu(sqlite_url: str) -> None:
    every = affinity(0)
    running, release = threading.Event(), threading.Event()

    def hold(i: int) -> set[int]:
        running.set()
        assert release.wait(WAIT)
        return affinity(0)  # the thread running the call: started by the (pinned) driver

    engine = Engine(sqlite_url)
    try:
        run = engine.start("await hold(1)", {"hold": hold}, key="pinned")
        assert running.wait(WAIT)
        worker = run._source.session.worker_pid  # the session's Monty worker process
        driver = driver_of("pinned")
        shared = affinity(driver.native_id)
        assert len(shared) == 1 and shared < every
        assert cpus.threads_of(worker) and all(affinity(tid) == shared for tid in cpus.threads_of(worker))
        release.set()
        assert run.result(WAIT) == every  # the call ran with every CPU of the process
        driver.join(WAIT)
        assert all(affinity(tid) == every for tid in cpus.threads_of(worker))  # given back at the end
    finally:
        release.set()
        engine.close()


def test_idle_pool_threads_wait_on_the_drivers_cpu_and_each_call_runs_with_every_cpu(sqlite_url: str) -> None:
    """A pool thread that ran out of work waits on the driver's CPU (the driver wakes it, and its
    outcome wakes the driver, without waking the other CPU); the next call it takes runs with
    every CPU again."""
    every = affinity(0)
    quick_thread: list[int] = []
    hold_thread: list[int] = []
    running, release = threading.Event(), threading.Event()

    def hold(i: int) -> set[int]:
        hold_thread.append(threading.get_native_id())
        running.set()
        assert release.wait(WAIT)
        return affinity(0)

    def quick(i: int) -> set[int]:
        quick_thread.append(threading.get_native_id())
        return affinity(0)

    def probe(i: int) -> tuple[int, set[int]]:
        return threading.get_native_id(), affinity(0)

    engine = Engine(sqlite_url)
    try:
        code = "held, done = await gather(hold(0), quick(1))\n[held, done, await probe(2)]"
        run = engine.start(code, {"hold": hold, "quick": quick, "probe": probe}, key="idle")
        assert running.wait(WAIT)
        shared = affinity(driver_of("idle").native_id)
        assert len(shared) == 1 and shared < every
        (idle,) = wait_until(lambda: quick_thread, timeout=WAIT, what="the quick call")
        # quick's thread, out of work while hold runs, goes back to the driver's CPU to wait
        wait_until(lambda: affinity(idle) == shared, timeout=WAIT, what="the idle thread on the driver's CPU")
        release.set()
        held, done, (probe_thread, probed) = run.result(WAIT)
        assert held == done == every  # both calls ran with every CPU
        assert probe_thread in (idle, *hold_thread)  # a thread that waited on the driver's CPU...
        assert probed == every  # ...runs its next call with every CPU
    finally:
        release.set()
        engine.close()


def test_drivers_running_meanwhile_keep_every_cpu(sqlite_url: str) -> None:
    """Their Monty workers too, though the pool may have started them from a pinned thread."""
    every = affinity(0)
    running = {key: threading.Event() for key in ("first", "second", "third")}
    release = threading.Event()

    def hold(key: str) -> str:
        running[key].set()
        assert release.wait(WAIT)
        return key

    engine = Engine(sqlite_url)
    runs: list[Any] = []
    try:
        for key in running:
            runs.append(engine.start(f"await hold({key!r})", {"hold": hold}, key=key))
            assert running[key].wait(WAIT)
        assert len(affinity(driver_of("first").native_id)) == 1
        for run in runs[1:]:
            assert affinity(driver_of(run.key).native_id) == every
            assert all(affinity(tid) == every for tid in cpus.threads_of(run._source.session.worker_pid))
        release.set()
        assert [run.result(WAIT) for run in runs] == list(running)
    finally:
        release.set()
        engine.close()


def test_a_worker_the_pool_started_from_a_pinned_thread_gets_every_cpu_under_a_driver_that_does_not_share() -> None:
    """A sharing driver that replaces a crashed worker checks a session out from its pinned
    thread, and the pool starts processes from the thread that asks: they inherit its pin."""
    every = affinity(0)
    release = cpus.share_one_cpu([threading.get_native_id()])  # this thread pinned, as a sharing driver's
    assert release is not None
    sessions: list[Any] = []
    try:
        while len(sessions) < 8 and not any(pinned(session.worker_pid) for session in sessions):
            sessions.append(sandbox.open_session())  # idle workers first (earlier tests left some), then new ones
            sessions[-1].feed_start("1")
    finally:
        release()
    try:
        workers = [session.worker_pid for session in sessions]
        assert any(pinned(pid) for pid in workers)  # the pool started one from this thread
        for session in sessions:
            assert sandbox.share_cpu(session, share=False) is None
        assert all(affinity(tid) == every for pid in workers for tid in cpus.threads_of(pid))
    finally:
        for session in sessions:
            sandbox.close_session(session)
