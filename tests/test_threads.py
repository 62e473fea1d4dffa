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
