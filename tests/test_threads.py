"""The threads executor's pool: a batch is taken by as many threads as the pool has, idle threads
wake for a later batch, and a withdrawn task is skipped without stalling the thread behind it.

Unit tests of one component (the executor alone, real threads); the driver's use of it is in
``test_engine.py`` and ``test_executor_contract.py``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from procs import wait_until

from durable_monty_nb.executors.base import LocalCall, Outcome, Task
from durable_monty_nb.executors.threads import ThreadExecutor

WAIT = 30  # seconds a test may wait for threads before it fails


def tasks(fn: Callable[..., Any], count: int, first: int = 0) -> list[Task]:
    made = []
    for i in range(first, first + count):
        task = Task("e" * 32, i, 1, fn.__name__)
        task.local = LocalCall(fn, (i,), {})
        made.append(task)
    return made


def outcomes(done: queue.SimpleQueue[Outcome], count: int) -> list[Outcome]:
    return [done.get(timeout=WAIT) for _ in range(count)]


def test_a_batch_runs_on_every_thread_of_the_pool_at_once() -> None:
    workers = 4
    meet = threading.Barrier(workers, timeout=WAIT)  # broken (and every call fails) unless 4 run at once

    def together(i: int) -> int:
        meet.wait()
        return i

    executor = ThreadExecutor(workers)
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    try:
        executor.submit(tasks(together, 3 * workers), done.put)  # three rounds of four
        got = outcomes(done, 3 * workers)
    finally:
        executor.shutdown()
    assert all(o.ok for o in got), [o.error for o in got if not o.ok]
    assert sorted(o.value for o in got) == list(range(3 * workers))


def test_idle_threads_wake_for_a_later_batch() -> None:
    workers = 3
    executor = ThreadExecutor(workers)
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    meet = threading.Barrier(workers, timeout=WAIT)

    def quick(i: int) -> int:
        return i

    def together(i: int) -> int:
        meet.wait()
        return i

    try:
        executor.submit(tasks(together, workers), done.put)  # the pool grows to three threads
        assert all(o.ok for o in outcomes(done, workers))
        for round_ in range(5):  # then small batches, one at a time, while the threads idle between
            executor.submit(tasks(quick, 1, first=10 + round_), done.put)
            assert outcomes(done, 1)[0].value == 10 + round_
        executor.submit(tasks(together, workers, first=100), done.put)  # needs all three awake again
        got = outcomes(done, workers)
    finally:
        executor.shutdown()
    assert all(o.ok for o in got), [o.error for o in got if not o.ok]
    assert len(executor._threads) == workers


def test_a_withdrawn_task_is_skipped_and_the_next_one_runs() -> None:
    executor = ThreadExecutor(1)
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    release = threading.Event()
    ran: list[int] = []

    def hold(i: int) -> int:
        assert release.wait(WAIT)
        ran.append(i)
        return i

    try:
        first, queued, last = tasks(hold, 3)
        executor.submit([first, queued, last], done.put)
        assert executor.withdraw([queued]) == [queued]  # the one thread holds the first task
        release.set()
        got = outcomes(done, 2)
    finally:
        executor.shutdown()
    assert [o.value for o in got] == [0, 2]
    assert ran == [0, 2]
    assert done.empty()


def test_a_held_pool_starts_no_queued_task_until_released_and_withdraw_takes_the_held_ones() -> None:
    """A stop request holds the pool from the thread that asks: the calls running finish, and the
    threads they free take nothing else, however long the driver takes to withdraw the rest."""
    executor = ThreadExecutor(2)
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    gate = threading.Event()
    running = threading.Barrier(3, timeout=WAIT)  # the two first tasks and the test
    started: list[int] = []

    def gated(i: int) -> int:
        started.append(i)
        if i < 2:
            running.wait()
            assert gate.wait(WAIT)
        return i

    try:
        batch = tasks(gated, 10)
        executor.submit(batch[:6], done.put)
        running.wait()  # two running, four queued
        executor.hold()
        executor.submit(batch[6:], done.put)  # submitted while held: held too
        gate.set()
        assert sorted(o.value for o in outcomes(done, 2)) == [0, 1]
        # Both threads free: each went through the queue (skipping the held tasks) and sleeps.
        wait_until(lambda: executor._idle._value == 2, what="both threads idle", timeout=WAIT)
        assert done.empty() and sorted(started) == [0, 1]
        assert executor.withdraw(batch[2:4]) == batch[2:4]  # withdrawn from the hold: never run
        executor.release()
        assert sorted(o.value for o in outcomes(done, 6)) == [4, 5, 6, 7, 8, 9]
    finally:
        executor.shutdown()
    assert sorted(started) == [0, 1, 4, 5, 6, 7, 8, 9]
    assert executor.counts() == (0, 0)
