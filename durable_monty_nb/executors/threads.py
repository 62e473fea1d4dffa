"""The default executor: a thread pool for plain functions, an event loop for ``async def`` ones.

Threads start on demand up to ``max_workers`` and run each task in the context the driver
captured (so, in a notebook, prints of a function land in the cell that started it).
Coroutine functions run concurrently on one background asyncio loop, not limited by the pool.

Why not ``concurrent.futures.ThreadPoolExecutor``: its workers are joined at interpreter exit,
so one hung notebook function would keep a kernel from shutting down (these are daemon
threads); and its futures cost about three times more per call (10,000 trivial calls: 0.18 s
against 0.064 s here, which is a tenth of a 10,000-call gather).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from .. import cpus, defaults
from .base import Done, Outcome, Task

_STOP = object()


class ThreadExecutor:
    """Threads of the driver's process (see the module docstring); attempts die with it."""

    name = "threads"
    remote = False
    durable = False
    pin_safe = True  # its threads run each call with every CPU: a driver's pin does not reach the calls
    problem = None

    def __init__(self, max_workers: int = defaults.WORKERS, name: str = "durable") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._name = name
        self._tasks: collections.deque[tuple[Task, Done]] = collections.deque()  # FIFO, taken by any thread
        self._wakes: queue.SimpleQueue[Any] = queue.SimpleQueue()  # wakes an idle thread (or stops one)
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)  # threads that found no task, less the wakes sent to them
        self._lock = threading.Lock()
        self._started = itertools.count()
        self._finished = itertools.count()
        self._started_n = 0
        self._finished_n = 0
        self._submitted = 0
        self._shutdown = False
        self._unclaimed: dict[int, tuple[Task, Done]] = {}  # queued for a thread, by id(task); popped once, by one side
        self._held: dict[int, tuple[Task, Done]] | None = None  # while held: queued tasks no thread may take
        self._abandoned: set[str] = set()  # cancelled while running in a thread (not killable)
        self._coroutines: dict[str, Any] = {}  # running asyncio tasks, by attempt id

    @property
    def running(self) -> int:
        """Attempts executing right now."""
        return max(self._started_n - self._finished_n, 0)

    def counts(self) -> tuple[int, int]:
        running = self.running
        return max(self._submitted - self._finished_n - running, 0), running

    def submit(self, tasks: Sequence[Task], done: Done) -> None:
        coroutine: dict[Any, bool] = {}
        queued: list[tuple[Task, Done]] = []
        for task in tasks:
            fn = task.local.fn  # type: ignore[union-attr]
            is_coroutine = coroutine.get(fn)
            if is_coroutine is None:
                is_coroutine = coroutine[fn] = inspect.iscoroutinefunction(fn)
            if is_coroutine:
                self._submitted += 1
                _event_loop().submit(task, done, self)
            else:
                queued.append((task, done))
        if not queued:
            return
        self._submitted += len(queued)
        with self._lock:  # against hold() from another thread: each task is queued or held, never both
            if self._held is not None:
                self._held.update((id(entry[0]), entry) for entry in queued)
                return
            self._queue(queued)
        self._wake(len(queued))

    def _queue(self, entries: Sequence[tuple[Task, Done]]) -> None:
        self._unclaimed.update((id(entry[0]), entry) for entry in entries)
        self._tasks.extend(entries)

    def _wake(self, queued: int) -> None:
        # A thread takes tasks until none is left, so a batch wakes at most one thread per slot of
        # the pool (an idle one, or a new one) instead of one per task: waking a thread for each
        # of 10,000 trivial calls cost more than the calls (the GIL passed back and forth).
        for _ in range(min(queued, self.max_workers)):
            if self._idle.acquire(blocking=False):
                self._wakes.put(None)
            elif not self._spawn():
                return

    def hold(self) -> None:
        """Start no queued task from now on (a stop request calls it, from any thread): running
        ones go on; the queued ones wait here until :meth:`withdraw` takes them or
        :meth:`release` queues them again."""
        with self._lock:
            if self._held is not None:
                return
            held = self._held = {}
            for key in list(self._unclaimed):  # the same atomic pop a thread makes before it runs one
                entry = self._unclaimed.pop(key, None)
                if entry is not None:
                    held[key] = entry

    def release(self) -> None:
        """Undo :meth:`hold` (a stop request undone): the tasks still held are queued again."""
        with self._lock:
            held, self._held = self._held, None
            if not held:
                return
            self._queue(list(held.values()))
        self._wake(len(held))

    def attach(self, tasks: Sequence[Task], done: Done) -> list[Task]:
        return list(tasks)  # threads of a dead process: every attempt is lost

    def withdraw(self, tasks: Sequence[Task]) -> list[Task]:
        """Take back the tasks no thread has taken yet (queued or held): they will never start.
        Returns those taken back (a task a thread took meanwhile runs, and reports as usual).
        Coroutines start at once: they are not taken back."""
        taken = []
        unclaimed = self._unclaimed
        with self._lock:
            held = self._held or {}
            for task in tasks:
                # atomic: a thread pops it, or we do
                if unclaimed.pop(id(task), None) is not None or held.pop(id(task), None) is not None:
                    taken.append(task)
        self._submitted -= len(taken)
        return taken

    def cancel(self, tasks: Sequence[Task]) -> None:
        """Coroutines are cancelled, queued tasks withdrawn. A thread cannot be killed: a running
        call is abandoned to finish on its own, and a new thread takes its place so the pool
        keeps its size."""
        loop = _LOOP
        for task in tasks:
            coroutine = self._coroutines.pop(task.id, None)
            if coroutine is not None and loop is not None:
                loop.loop.call_soon_threadsafe(coroutine.cancel)
            elif not self.withdraw([task]):
                with self._lock:
                    self._abandoned.add(task.id)
                self._spawn()

    def _spawn(self) -> bool:
        """Start a thread; False when the pool is full (or shut down)."""
        with self._lock:
            if self._shutdown or len(self._threads) >= self.max_workers + len(self._abandoned):
                return False
            thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
        thread.start()
        return True

    def _work(self) -> None:
        # Started by a driver that shares a CPU with its Monty worker: wait for tasks on that CPU
        # (the driver wakes this thread, and its outcome wakes the driver, without waking the
        # other CPU), and run each call with every CPU (see cpus.py).
        home = cpus.home_of_this_thread()
        pinned = home is not None
        take, wait = self._tasks.popleft, self._wakes.get
        unclaimed = self._unclaimed
        while True:
            try:
                task, done = take()
            except IndexError:  # nothing to do: idle until woken (a wake may be waiting already)
                if home is not None and not pinned:
                    cpus.pin_this_thread(home)
                    pinned = True
                self._idle.release()
                if wait() is _STOP:
                    return
                continue
            if unclaimed.pop(id(task), None) is None:  # withdrawn (or cancelled) before it started
                continue
            if pinned:
                cpus.unpin_this_thread()
                pinned = False
            outcome = self.run_task(task)
            if inspect.iscoroutine(outcome.value) and outcome.ok:  # e.g. functools.partial(async_fn)
                outcome = _event_loop().run_blocking(task, outcome.value)
            abandoned = False
            if self._abandoned:  # read without the lock: set only by cancel, checked again under it
                with self._lock:
                    abandoned = task.id in self._abandoned
                    if abandoned:  # a replacement took this thread's place: end it
                        self._abandoned.discard(task.id)
                        self._threads.remove(threading.current_thread())
            done(outcome)  # ignored by the driver if the attempt timed out
            if abandoned:
                return

    def run_task(self, task: Task) -> Outcome:
        self._started_n = next(self._started) + 1
        started = task.started_at = time.time()
        call = task.local
        try:
            outcome = Outcome.of(task, started, value=call.context.run(call.fn, *call.args, **call.kwargs))  # type: ignore[union-attr]
        except BaseException as exc:
            outcome = Outcome.of(task, started, error=exc)
        self._finished_n = next(self._finished) + 1
        return outcome

    def shutdown(self) -> None:
        """Stop idle threads once the queue drains; running attempts finish on their own."""
        with self._lock:
            self._shutdown = True
            for _ in self._threads:  # each thread takes one once it finds no task left
                self._wakes.put(_STOP)


class _EventLoop:
    """One daemon thread running an asyncio loop for coroutine functions."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run, name="durable-asyncio", daemon=True)
        thread.start()

    def _run(self) -> None:
        cpus.unpin_this_thread()
        self.loop.run_forever()

    def submit(self, task: Task, done: Done, executor: ThreadExecutor) -> None:
        def report(finished: asyncio.Task[Outcome]) -> None:
            executor._coroutines.pop(task.id, None)
            if finished.cancelled():  # timed out: the driver settled it already
                executor._finished_n = next(executor._finished) + 1
                return
            done(finished.result())

        def schedule() -> None:
            # Run in the driver's context, so prints land where the execution started.
            call = task.local
            attempt = _attempt(task, lambda: call.fn(*call.args, **call.kwargs), executor)
            running = self.loop.create_task(attempt, context=call.context)
            executor._coroutines[task.id] = running
            running.add_done_callback(report)

        self.loop.call_soon_threadsafe(schedule)

    def run_blocking(self, task: Task, coroutine: Any) -> Outcome:
        """Await a coroutine that a plain function returned, from a pool thread."""
        return asyncio.run_coroutine_threadsafe(_attempt(task, lambda: coroutine), self.loop).result()


async def _attempt(task: Task, start: Any, executor: ThreadExecutor | None = None) -> Outcome:
    if executor is not None:
        executor._started_n = next(executor._started) + 1
    started = task.started_at = time.time()
    try:
        outcome = Outcome.of(task, started, value=await start())
    except BaseException as exc:
        outcome = Outcome.of(task, started, error=exc)
    if executor is not None:
        executor._finished_n = next(executor._finished) + 1
    return outcome


_LOOP: _EventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> _EventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = _EventLoop()
        return _LOOP
