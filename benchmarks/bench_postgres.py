"""Ours on a PostgreSQL store beside the floor of the same server, measured in one run (issue 20).

    python benchmarks/bench_postgres.py                         # both workloads, best of 5
    python benchmarks/bench_postgres.py --only sequential-1000 --repeat 9
    python benchmarks/bench_postgres.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test

``--url`` names a server (default ``$DURABLE_BENCH_POSTGRES_URL``, else the development machine's
``postgresql+psycopg://postgres@127.0.0.1:5432/test``); the benchmark works in a database of its own
there (``bench_pg_<pid>``), created fresh for every run and dropped after it.

Workloads (``task(i) -> i*2``, default durability):

- ``sequential-1000``: ``total = total + await task(i)`` in a loop: 1,000 driver steps;
- ``gather-1000``: ``await gather(*[task(i) for i in range(n)])``;
- ``store-steps-1000``: the store alone, ``Store.commit`` of 1,000 steps shaped like the loop's
  (a new call row, the previous call's result, a 2.7 KB checkpoint, the counters); its floor is
  the commits alone.

Ours runs through ``Engine.run`` in a fresh subprocess, as benchmarks/peers/run.py runs it: the
engine opens the store (its tables created), a one-call warm-up workflow runs, then the workload
is timed with ``time.perf_counter`` around ``Engine.run`` and its result checked.

The floor, measured in the same round of runs (floor.py's sandbox part, and PostgreSQL commits):

- ``monty``: bare Monty running the same body as the driver feeds it (``floor.sandbox_seconds``);
- ``commits``: one one-row ``INSERT`` and ``COMMIT`` per sequential step (one for a gather) over
  one psycopg connection, on a fresh table, the server's default ``synchronous_commit``.
- ``design`` (sequential steps): the same Monty steps and commits in one loop, each call handed
  to a thread and back (``floor.stepped_seconds``): this design's floor, with no driver of ours.

Runs are interleaved (ours, the floor, ours, ...) so a drift of the machine's speed hits both; the
best of ``--repeat`` of each is printed, with ours / floor. Figures, not assertions; not collected
by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = "BENCH-RESULT "
DEFAULT_URL = os.environ.get("DURABLE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

GATHER = "results = await gather(*[task(i) for i in range(n)])\nlen(results)"
SEQUENTIAL = "total = 0\nfor i in range(n):\n    total = total + await task(i)\ntotal"
# name: (cell body, n, expected result, commits of the floor)
WORKLOADS: dict[str, tuple[str, int, int, int]] = {
    "sequential-1000": (SEQUENTIAL, 1_000, sum(i * 2 for i in range(1_000)), 1_000),
    "gather-1000": (GATHER, 1_000, 1_000, 1),
    "store-steps-1000": ("", 1_000, 0, 1_000),
}


def task(i: int) -> int:
    return i * 2


# -- a database of our own --------------------------------------------------------------------


def database_url(base: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(base).set(database=name).render_as_string(hide_password=False)


def libpq(url: str) -> str:
    """A psycopg conninfo of a SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def recreate(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(libpq(base), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")


def drop(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(libpq(base), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- the children: one measurement each ----------------------------------------------------------


def store_steps(n: int, url: str) -> dict[str, float]:
    """Seconds for ``n`` steps of a sequential loop written through ``Store.commit`` alone."""
    from durable_monty_nb.store.store import Step, Store, new_owner, pending_call_row

    store = Store(url)
    owner, execution_id = new_owner(), "e" * 32
    values = {"id": execution_id, "key": "steps", "status": "running", "code": "", "code_hash": "h"}
    values.update(code_sig="s", monty_version="1.4.0", fingerprints=None, previous_id=None)
    store.create_execution(values, owner, 60, expected_latest=None)
    checkpoint = (Path(__file__).read_bytes() * 2)[:2700]

    def call(i: int) -> dict[str, Any]:
        return pending_call_row(execution_id, i, "task", "f" * 64, f"[[{i}],{{}}]", f"{i:064d}")

    def done(i: int) -> dict[str, Any]:
        return {
            "call_id": i,
            "status": "done",
            "attempts": 1,
            "result": str(i * 2),
            "error": None,
            "error_type": None,
            "error_message": None,
            "due_at": None,
            "started_at": 1.0,
            "finished_at": 2.0,
            "worker": None,
        }

    store.commit(execution_id, owner, 60, Step(new_calls=[call(0)], checkpoint=checkpoint))
    start = time.perf_counter()
    for i in range(1, n + 1):
        step = Step(new_calls=[call(i)], call_updates=[done(i - 1)], checkpoint=checkpoint)
        step.execution.update(calls_total=i + 1, calls_done=i, calls_failed=0, calls_reused=0)
        store.commit(execution_id, owner, 60, step)
    seconds = time.perf_counter() - start
    store.close()
    return {"seconds": seconds}


def ours(workload: str, url: str) -> dict[str, float]:
    os.environ.setdefault("DURABLE_MONTY_KEY", "benchmark")
    if workload.startswith("store-"):
        return store_steps(WORKLOADS[workload][1], url)
    from durable_monty_nb import Engine

    body, n, expected, _ = WORKLOADS[workload]
    engine = Engine(url)
    engine.run("await task(0)", {"task": task}, key="warm-up")  # the Monty pool, imports, connections
    start = time.perf_counter()
    result = engine.run(body, {"task": task, "n": n}, key="bench")
    seconds = time.perf_counter() - start
    engine.close()
    if result != expected:
        raise SystemExit(f"wrong result {result!r}, expected {expected!r}")
    return {"seconds": seconds}


def commits(steps: int, url: str) -> float:
    """Seconds for ``steps`` one-row INSERT + COMMIT transactions over one psycopg connection."""
    import psycopg

    with psycopg.connect(libpq(url)) as conn:
        conn.execute("CREATE TABLE floor (id bigserial PRIMARY KEY, v text)")
        conn.commit()
        start = time.perf_counter()
        for i in range(steps):
            conn.execute("INSERT INTO floor (v) VALUES (%s)", (str(i),))
            conn.commit()
        return time.perf_counter() - start


def floor(workload: str, url: str) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).parent))
    import floor as sandbox_floor  # type: ignore[import-not-found]

    body, n, _, steps = WORKLOADS[workload]
    monty = sandbox_floor.sandbox_seconds(body, n) if body else 0.0
    figures = {"monty": monty, "commits": commits(steps, url)}
    if workload.startswith("sequential-"):
        figures["design"] = stepped(body, n, url)
    return figures


def stepped(body: str, n: int, url: str) -> float:
    """This design's floor: the same Monty steps with one commit each in one loop, each call
    handed to a thread and back (``floor.stepped_seconds``), on this server."""
    import floor as sandbox_floor  # type: ignore[import-not-found]
    import psycopg

    with psycopg.connect(libpq(url)) as conn:
        conn.execute("CREATE TABLE stepped (id bigserial PRIMARY KEY, v text)")
        conn.commit()

        def commit(value: int) -> None:
            conn.execute("INSERT INTO stepped (v) VALUES (%s)", (str(value),))
            conn.commit()

        return sandbox_floor.stepped_seconds(body, n, hand_off=True, commit=commit)


def run_child(kind: str, workload: str, base: str) -> dict[str, float]:
    name = f"bench_pg_{os.getpid()}"
    recreate(base, name)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps([kind, workload, database_url(base, name)])],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        drop(base, name)
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"{kind} {workload} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=tuple(WORKLOADS))
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best of each is printed (default 5)")
    parser.add_argument("--url", default=DEFAULT_URL, help="a PostgreSQL server (SQLAlchemy URL)")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures to FILE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, workload, url = json.loads(args.child)
        figures: dict[str, Any] = ours(workload, url) if kind == "ours" else floor(workload, url)
        print(MARK + json.dumps(figures), flush=True)
        return

    print(
        f"# PostgreSQL store ({args.url.rsplit('@', 1)[-1]}), Engine.run after a warm-up, Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"best of {args.repeat}, ours and the floor interleaved"
    )
    header = (
        f"{'workload':<16} {'ours (s)':>9} {'runs (s)':<36} {'monty (s)':>9} {'commits (s)':>11} "
        f"{'floor (s)':>9} {'ours/floor':>10} {'design (s)':>10}"
    )
    print(header)
    print("-" * len(header))
    every: dict[str, dict[str, list[dict[str, float]]]] = {}
    for workload in args.only or list(WORKLOADS):
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "floor": []}
        for _ in range(max(args.repeat, 1)):
            for kind in runs:
                runs[kind].append(run_child(kind, workload, args.url))
        every[workload] = runs
        best = min(r["seconds"] for r in runs["ours"])
        monty = min(r["monty"] for r in runs["floor"])
        commit = min(r["commits"] for r in runs["floor"])
        listed = " ".join(f"{r['seconds']:.3f}" for r in runs["ours"])
        total = monty + commit
        designs = [r["design"] for r in runs["floor"] if "design" in r]
        design = f"{min(designs):.3f}" if designs else ""
        print(
            f"{workload:<16} {best:>9.3f} {listed:<36} {monty:>9.3f} {commit:>11.3f} {total:>9.3f} "
            f"{best / total:>9.2f}x {design:>10}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(every, indent=1))


if __name__ == "__main__":
    main()
