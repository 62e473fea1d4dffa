"""What this machine allows: the same workload driven by bare Monty, and bare SQLite commits.

    python benchmarks/floor.py                       # every workload of bench_ipython.py
    python benchmarks/floor.py --only sequential-1000

The sandbox floor runs the cell body in a Monty session the way the driver must: the code the
driver feeds (a gathered comprehension of notebook calls rewritten into one host call that gets
every argument tuple, ``analysis.rewrite_gathers``), every other call announced and answered with
a future (one round trip to the Monty worker each), a ``dump()`` wherever the driver checkpoints
(each time new calls were announced), results resumed in batches of 1,000. No store, no
executor, no bookkeeping. Like the driver on the threads executor, the measuring thread, the
pool's I/O threads and the session's worker share one CPU (``durable_monty_nb.cpus``; on this
2-core VM that made bare sequential steps about 5x faster); the column ``apart`` is the same
without. ``--per-call`` also prints the floor of the code as written (every
call of a gather announced one by one: the floor before batching). The commit floor is one ``INSERT`` and
``COMMIT`` per step on a raw ``sqlite3`` connection with the store's PRAGMAs (WAL,
``synchronous=FULL``, or ``NORMAL`` for ``--durability process``).

For sequential workloads two more columns do the same work in one loop instead of apart: ``one
loop`` commits each step's row between Monty's dump and its answer, as a driver must (the fsync
then sits between Monty's crossings); ``+ hand-off`` also computes each answer on another
thread, as the threads executor does. That last one is this design's floor: a driver that did
no Python of its own would still take it.

``bench_ipython.py`` prints these beside its figures, so "ours minus the floor" can be read on a
machine whose speed drifts (this VM's varies by about 2x between sessions). Figures, not tests.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic_monty import FunctionSnapshot, FutureSnapshot, NameLookupSnapshot

from durable_monty_nb.engine import sandbox
from durable_monty_nb.engine.analysis import GATHER_FUNCTION, analyze

RESUME_BATCH = 1000


def sandbox_seconds(body: str, n: int, *, batched: bool = True, share_cpu: bool = True) -> float:
    """Seconds bare Monty takes to run ``body`` with ``task(i)`` answered at once by ``i * 2``
    (with ``batched``, the code the driver feeds: gathered comprehensions as one host call; with
    ``share_cpu``, on one CPU with its worker, as the driver runs). A session of the driver's
    pool, with its settings; nothing else of the driver."""
    code = analyze(body).fed if batched else body
    session = sandbox.open_session()
    try:
        session.feed_start(sandbox.PRELUDE)
        release = sandbox.share_cpu(session) if share_cpu else None
        try:
            return _drive(session, code, n)
        finally:
            if release is not None:
                release()
    finally:
        sandbox.close_session(session)


def _drive(session: Any, code: str, n: int) -> float:
    """Feed ``code`` and answer every call and name at once; the seconds it took."""
    start = time.perf_counter()
    snap = session.feed_start(code)
    answers: dict[int, int] = {}
    announced = False
    while True:
        kind = type(snap)
        if kind is NameLookupSnapshot:
            snap = snap.resume(value=n)
        elif kind is FunctionSnapshot and snap.function_name == GATHER_FUNCTION:
            answers[snap.call_id] = [args[0] * 2 for args, _ in snap.args[1]]
            announced = True
            snap = snap.resume({"future": ...})
        elif kind is FunctionSnapshot:
            answers[snap.call_id] = snap.args[0] * 2
            announced = True
            snap = snap.resume({"future": ...})
        elif kind is FutureSnapshot:
            if announced:
                snap.dump()  # the checkpoint before dispatch
                announced = False
            ready = [c for c in snap.pending_call_ids if c in answers][:RESUME_BATCH]
            snap = snap.resume({c: {"return_value": answers.pop(c)} for c in ready})
        else:
            return time.perf_counter() - start


def stepped_seconds(
    body: str,
    n: int,
    synchronous: str = "FULL",
    *,
    hand_off: bool = False,
    commit: Callable[[int], None] | None = None,
) -> float:
    """Seconds for ``body`` (sequential awaits of ``task(i)``, one call a step) doing what the
    floor counts for each step in one loop instead of apart: bare Monty announces the call and
    dumps, and the step commits (one one-row ``INSERT`` and ``COMMIT`` on SQLite, or ``commit``
    of the call's argument: ``bench_postgres.py`` passes PostgreSQL's) before the call is
    answered, as a driver must. With ``hand_off``, each answer is also computed on another
    thread and handed back through two queues, as the threads executor's pool does: this
    design's floor, with none of the driver's own Python. Same CPU sharing as the driver."""
    import queue
    import threading

    session = sandbox.open_session()
    tasks: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    outcomes: queue.SimpleQueue[int] = queue.SimpleQueue()

    def pool_thread() -> None:
        while (i := tasks.get()) is not None:
            outcomes.put(i * 2)

    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        conn = _commit_connection(Path(tmp) / "floor.db", synchronous)

        def sqlite_commit(value: int) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (str(value),))
            conn.execute("COMMIT")

        commit_step = commit or sqlite_commit
        try:
            session.feed_start(sandbox.PRELUDE)
            release = sandbox.share_cpu(session)
            worker = threading.Thread(target=pool_thread, daemon=True)
            worker.start()  # after the pinning: it waits on the driver's CPU, as the pool's threads do
            try:
                start = time.perf_counter()
                snap = session.feed_start(analyze(body).fed)
                value = None
                while True:
                    kind = type(snap)
                    if kind is NameLookupSnapshot:
                        snap = snap.resume(value=n)
                    elif kind is FunctionSnapshot:
                        value = snap.args[0]
                        snap = snap.resume({"future": ...})
                    elif kind is FutureSnapshot:
                        snap.dump()
                        commit_step(value)
                        if hand_off:
                            tasks.put(value)
                            answer = outcomes.get()
                        else:
                            answer = value * 2
                        (call_id,) = snap.pending_call_ids
                        snap = snap.resume({call_id: {"return_value": answer}})
                    else:
                        return time.perf_counter() - start
            finally:
                tasks.put(None)
                worker.join()
                if release is not None:
                    release()
        finally:
            conn.close()
            sandbox.close_session(session)


def _commit_connection(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    return conn


def commit_seconds(steps: int, synchronous: str = "FULL") -> float:
    """Seconds for ``steps`` one-row transactions on a fresh SQLite file in WAL mode."""
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        conn = _commit_connection(Path(tmp) / "floor.db", synchronous)
        start = time.perf_counter()
        for i in range(steps):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (str(i),))
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        conn.close()
        return elapsed


def main() -> None:
    from bench_ipython import WORKLOADS  # type: ignore[import-not-found]

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="NAME", help="a workload of bench_ipython.py")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is printed (default 3)")
    parser.add_argument("--per-call", action="store_true", help="also the floor of calls announced one by one")
    args = parser.parse_args()
    names = args.only or [name for name in WORKLOADS if not name.startswith("resume-")]
    extra = f" {'per call (s)':>13}" if args.per_call else ""
    heads = f"{'sandbox (s)':>12} {'apart (s)':>10} {'commits FULL (s)':>17} {'commits NORMAL (s)':>19}"
    heads += f" {'one loop (s)':>13} {'+ hand-off (s)':>15}"
    print(f"{'workload':<20} {heads}{extra}")
    for name in names:
        body, n, _, _ = WORKLOADS[name]
        steps = n if "sequential" in name else 1
        sandbox = min(sandbox_seconds(body, n) for _ in range(args.repeat))
        apart = min(sandbox_seconds(body, n, share_cpu=False) for _ in range(args.repeat))
        full = min(commit_seconds(steps, "FULL") for _ in range(args.repeat))
        normal = min(commit_seconds(steps, "NORMAL") for _ in range(args.repeat))
        per_call = ""
        if args.per_call:
            per_call = f" {min(sandbox_seconds(body, n, batched=False) for _ in range(args.repeat)):>13.3f}"
        stepped = handed = ""
        if "sequential" in name:
            synchronous = "NORMAL" if name.endswith("-process") else "FULL"
            stepped = f"{min(stepped_seconds(body, n, synchronous) for _ in range(args.repeat)):.3f}"
            handed = f"{min(stepped_seconds(body, n, synchronous, hand_off=True) for _ in range(args.repeat)):.3f}"
        print(
            f"{name:<20} {sandbox:>12.3f} {apart:>10.3f} {full:>17.3f} {normal:>19.3f} {stepped:>13} {handed:>15}"
            f"{per_call}",
            flush=True,
        )


if __name__ == "__main__":
    main()
