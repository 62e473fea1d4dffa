"""Resume time of a 10,000-call execution killed (SIGKILL) halfway, on a SQLite file store.

    python benchmarks/bench_resume.py [--calls 10000]

A child process runs ``gather`` over N trivial calls whose second half blocks; once the first
half is committed it is killed. This process then resumes the execution and prints the time to
restore it (checkpoint, journal, snapshot: until the remaining calls are dispatched) and the
time to completion, beside the remaining calls run on plain threads.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DURABLE_MONTY_KEY", "benchmark")

from durable_monty_nb import Engine
from durable_monty_nb.store.store import Store

CODE = "results = await gather(*[task(i) for i in range(n)])\nlen(results)"
_never = threading.Event()


def task(i: int) -> int:
    if i >= int(os.environ.get("BLOCK_FROM", "1000000000")):
        _never.wait()
    return i * 2


def child(db: str, n: int) -> None:
    Engine(db).run(CODE, {"task": task, "n": n}, key="resume-bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--child", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls)
        return

    half = args.calls // 2
    with tempfile.TemporaryDirectory() as folder:
        db = str(Path(folder) / "resume.db")
        env = {**os.environ, "BLOCK_FROM": str(half)}
        proc = subprocess.Popen([sys.executable, __file__, "--child", db, "--calls", str(args.calls)], env=env)
        store = None
        while True:
            if proc.poll() is not None:
                raise SystemExit("the child process exited early")
            if store is None and Path(db).exists():
                store = Store(db)
            row = store.latest_execution("resume-bench") if store else None
            if row is not None and row.calls_done >= half:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        engine = Engine(db)
        engine.run("1", {}, key="warm-up")  # imports and the Monty pool are not the workload
        start = time.perf_counter()
        run = engine.resume("resume-bench", {"task": task, "n": args.calls})
        restored = time.perf_counter() - start
        assert run.result() == args.calls
        total = time.perf_counter() - start
        progress = run.progress

    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(task, range(half, args.calls)))
    plain = time.perf_counter() - start
    print(f"execution of {args.calls} calls killed with {progress.restored} committed")
    print(f"{'resume() returns (journal and snapshot loaded)':<42} {restored:>8.3f} s")
    print(f"{'resume to completion':<42} {total:>8.3f} s")
    print(f"{'remaining calls on plain threads':<42} {plain:>8.3f} s   ratio {total / plain:.1f}x")


if __name__ == "__main__":
    main()
