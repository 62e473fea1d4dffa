"""The dask executor against plain Dask futures, and a scikit-learn sweep three ways.

    python benchmarks/bench_dask.py                  # all parts
    python benchmarks/bench_dask.py trivial sleepy   # (a) and (b) only
    python benchmarks/bench_dask.py sweep            # (c) only

(a) ``trivial``: 10,000 trivial calls fanned out with ``Engine.run`` on a cluster of a
    ``dask scheduler`` and 2 single-threaded ``dask worker`` processes, against
    ``client.map`` + ``client.gather`` of the same function on the same cluster.
(b) ``sleepy``: the same with 1,000 calls of 10 ms.
(c) ``sweep``: 12 fits of a RandomForestClassifier (100 trees, 2,000 samples) as a plain loop,
    with ``executor="threads"`` and with ``executor=Dask()`` (a LocalCluster of processes).

The store is a SQLite file; every durable run starts a new execution. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DURABLE_MONTY_KEY", "benchmark")

from durable_monty_nb import Engine
from durable_monty_nb.executors.dask import Dask, close_clients

DASK = str(Path(sys.executable).parent / "dask")
GATHER = "results = await gather(*[fn(i) for i in range(n)])\nlen(results)"
SWEEP = "scores = await gather(*[fit(depth, features) for depth, features in grid])\nscores"
GRID = [list(p) for p in itertools.product([None, 4, 8, 16], ["sqrt", "log2", 0.5])]


def trivial(i: int) -> int:
    return i * 2


def sleepy(i: int) -> int:
    time.sleep(0.01)
    return i


def fit(depth: int | None, features: str | float) -> float:
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    x, y = make_classification(n_samples=2000, n_features=20, n_informative=8, random_state=0)
    x_train, x_test, y_train, y_test = train_test_split(x, y, random_state=0)
    model = RandomForestClassifier(n_estimators=100, max_depth=depth, max_features=features, random_state=0)
    return float(model.fit(x_train, y_train).score(x_test, y_test))


class Cluster:
    """``dask scheduler`` and 2 ``dask worker --nthreads 1`` processes on 127.0.0.1."""

    def __init__(self, folder: Path) -> None:
        from distributed import Client

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        log = open(folder / "cluster.log", "ab")  # noqa: SIM115 - the processes keep it
        common = {"stdout": log, "stderr": subprocess.STDOUT, "cwd": folder}
        scheduler = [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
        worker = [DASK, "worker", self.address, "--nthreads", "1", "--nworkers", "1", "--no-nanny", "--no-dashboard"]
        self.procs = [subprocess.Popen(scheduler, **common)]
        self.procs += [subprocess.Popen(worker, **common) for _ in range(2)]
        try:
            self.client = Client(self.address, timeout=30, set_as_default=False)
            self.client.wait_for_workers(2, timeout=60)
        except BaseException:
            self.kill()
            raise

    def close(self) -> None:
        self.client.close()
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def timed_run(engine: Engine, code: str, namespace: dict[str, Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = engine.run(code, namespace, key=f"bench-{time.time_ns()}")
    return time.perf_counter() - start, value


def plain_map(client: Any, fn: Any, n: int) -> float:
    start = time.perf_counter()
    results = client.gather(client.map(fn, range(n), pure=False))
    assert len(results) == n
    return time.perf_counter() - start


def fan_out(cluster: Cluster, folder: Path, name: str, fn: Any, n: int) -> None:
    engine = Engine(folder / f"{name}.db", executor=Dask(cluster.address))
    timed_run(engine, GATHER, {"fn": fn, "n": 20})  # warm-up: client, workers' imports, schema
    plain_map(cluster.client, fn, 20)
    durable, value = timed_run(engine, GATHER, {"fn": fn, "n": n})
    assert value == n
    plain = plain_map(cluster.client, fn, n)
    engine.close()
    print(
        f"{name:8} {n:>6} calls   durable {durable:7.2f} s ({n / durable:7.0f}/s)   "
        f"client.map+gather {plain:6.2f} s ({n / plain:7.0f}/s)   ratio {durable / plain:5.2f}x",
        flush=True,
    )


def sweep(folder: Path) -> None:
    namespace = {"fit": fit, "grid": GRID}
    fit(None, "sqrt")  # imports and caches warm in this process

    start = time.perf_counter()
    expected = [fit(depth, features) for depth, features in GRID]
    loop = time.perf_counter() - start

    threads_engine = Engine(folder / "sweep-threads.db", executor="threads")
    threads, scores = timed_run(threads_engine, SWEEP, namespace)
    assert scores == expected
    threads_engine.close()

    start = time.perf_counter()
    dask_engine = Engine(folder / "sweep-dask.db", executor=Dask())
    warm_up = {"fit": fit, "grid": [[4, "sqrt"]] * (os.cpu_count() or 1) * 2}
    dask_engine.run(SWEEP, warm_up, key="warm-up")  # cluster start, imports on every worker
    startup = time.perf_counter() - start
    dask, scores = timed_run(dask_engine, SWEEP, namespace)
    assert scores == expected
    dask_engine.close()

    print(f"sweep    12 RandomForest fits on {os.cpu_count()} cores")
    print(f"  plain loop                 {loop:6.2f} s")
    print(f"  executor='threads'         {threads:6.2f} s   speedup {loop / threads:4.2f}x")
    print(
        f"  executor=Dask() (local)    {dask:6.2f} s   speedup {loop / dask:4.2f}x   "
        f"(+{startup:.1f} s once: LocalCluster start and warm-up)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", help="trivial, sleepy, sweep (default: all)")
    parts = parser.parse_args().parts or ["trivial", "sleepy", "sweep"]
    unknown = set(parts) - {"trivial", "sleepy", "sweep"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        if "trivial" in parts or "sleepy" in parts:
            cluster = Cluster(folder)
            try:
                if "trivial" in parts:
                    fan_out(cluster, folder, "trivial", trivial, 10_000)
                if "sleepy" in parts:
                    fan_out(cluster, folder, "sleepy", sleepy, 1_000)
            finally:
                close_clients()
                cluster.close()
        if "sweep" in parts:
            try:
                sweep(folder)
            finally:
                close_clients()


if __name__ == "__main__":
    main()
