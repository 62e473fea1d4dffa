"""Engine throughput against plain threads (no durability), on a SQLite file store.

    python benchmarks/bench_engine.py            # all workloads
    python benchmarks/bench_engine.py gather-10000 sequential-1000

Each workload runs end to end (new execution, store writes, Monty, threads) and is printed
beside the same work done with a plain ThreadPoolExecutor. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DURABLE_MONTY_KEY", "benchmark")

from durable_monty_nb import Engine


def task(i: int) -> int:
    return i * 2


def sleepy(i: int) -> int:
    time.sleep(0.05)
    return i


def durable(code: str, namespace: dict[str, Any], workers: int = 32) -> float:
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(Path(folder) / "bench.db", workers=workers)
        engine.run("1", {}, key="warm-up")  # pool start and imports are not the workload
        start = time.perf_counter()
        engine.run(code, namespace, key="bench")
        elapsed = time.perf_counter() - start
        engine.close()
    return elapsed


def plain_gather(n: int, fn: Callable[[int], int] = task, workers: int = 32) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, range(n)))
    return time.perf_counter() - start


def plain_sequential(n: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        total = 0
        for i in range(n):
            total += pool.submit(task, i).result()
    return time.perf_counter() - start


GATHER = "results = await gather(*[task(i) for i in range(n)])\nlen(results)"
SEQUENTIAL = "total = 0\nfor i in range(n):\n    total = total + await task(i)\ntotal"


def workloads() -> dict[str, tuple[Callable[[], float], Callable[[], float]]]:
    found: dict[str, tuple[Callable[[], float], Callable[[], float]]] = {}
    for n in (10, 1000, 10000):
        found[f"gather-{n}"] = (lambda n=n: durable(GATHER, {"task": task, "n": n}), lambda n=n: plain_gather(n))
    found["sequential-1000"] = (
        lambda: durable(SEQUENTIAL, {"task": task, "n": 1000}),
        lambda: plain_sequential(1000),
    )
    found["sleep-200x50ms-50-threads"] = (
        lambda: durable(GATHER.replace("task", "sleepy"), {"sleepy": sleepy, "n": 200}, workers=50),
        lambda: plain_gather(200, sleepy, workers=50),
    )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="workloads to run (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload; the best is printed")
    args = parser.parse_args()
    chosen = workloads()
    names = args.names or list(chosen)
    print(f"{'workload':<28} {'durable (s)':>12} {'plain threads (s)':>18} {'ratio':>7}")
    for name in names:
        run_durable, run_plain = chosen[name]
        best_durable = min(run_durable() for _ in range(args.repeat))
        best_plain = min(run_plain() for _ in range(args.repeat))
        print(f"{name:<28} {best_durable:>12.3f} {best_plain:>18.3f} {best_durable / best_plain:>7.1f}x", flush=True)


if __name__ == "__main__":
    main()
