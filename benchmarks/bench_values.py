"""Real-sized values, against a plain loop and joblib.Memory (issue 20's "real-sized values").

    python benchmarks/bench_values.py                 # both workloads, best of 3
    python benchmarks/bench_values.py --only arrays --repeat 1

Workloads:

- ``arrays``: 100 calls that each return a 2 MB float64 array, then one call that sums them.
- ``frame``: a 400 MB DataFrame of the notebook (5,000,000 x 10 float64) read by 8 calls, each
  summing one column.

Each is run these ways, every run in a fresh process: a plain loop; ``joblib.Memory`` on a fresh
folder (first run) and again on that folder (from its cache: each call looked up by its arguments);
ours through ``Engine.run`` on a fresh SQLite file store (first run), then in new processes on that
store: the same cell again (``durable-stored``: the completed run's result comes back from the
store, its inputs fingerprinted to know nothing changed), an edited cell making the same calls
(``durable-reused``: each call answered from the store by its call key, like joblib's cache), and
the same cell with ``rerun=True`` (``durable-rerun``: every call runs again; values already in the
store are not written twice). Only the workload is timed (not imports, building the DataFrame,
opening the store or the cache). Peak RSS is the child's ``ru_maxrss``. Figures, not assertions;
needs joblib.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARK = "BENCH-RESULT "
ROOT = Path(__file__).resolve().parents[1]
ARRAYS_CODE = "arrays = await gather(*[make(i) for i in range(100)])\nawait total(arrays)"
FRAME_CODE = "sums = await gather(*[column_sum(df, k) for k in range(8)])\nsum(sums)"
# The same calls from edited cells (another final line, the same result): answered call by call.
EDITED = {
    "arrays": "arrays = await gather(*[make(i) for i in range(100)])\nresult = await total(arrays)\nresult",
    "frame": "sums = await gather(*[column_sum(df, k) for k in range(8)])\nresult = sum(sums)\nresult",
}


def make(i: int) -> Any:
    import numpy as np

    return np.random.default_rng(i).random(262_144)  # 2 MB of float64


def total(arrays: list[Any]) -> float:
    return float(sum(float(a.sum()) for a in arrays))


def column_sum(df: Any, k: int) -> float:
    return float(df[k % 10].sum())


def frame() -> Any:
    import numpy as np
    import pandas as pd

    return pd.DataFrame(np.random.default_rng(0).random((5_000_000, 10)))  # 400 MB


def child(workload: str, way: str, folder: Path) -> dict[str, float]:
    import numpy  # noqa: F401  (imported before the clock starts, as joblib imports it: not the workload)

    namespace: dict[str, Any] = {"make": make, "total": total, "column_sum": column_sum}
    if workload == "frame":
        namespace["df"] = frame()
    code = ARRAYS_CODE if workload == "arrays" else FRAME_CODE
    if way == "plain":
        start = time.perf_counter()
        if workload == "arrays":
            total([make(i) for i in range(100)])
        else:
            sum(column_sum(namespace["df"], k) for k in range(8))
    elif way.startswith("joblib"):
        from joblib import Memory

        memory = Memory(str(folder / "joblib"), verbose=0)
        start = time.perf_counter()
        if workload == "arrays":
            cached_make, cached_total = memory.cache(make), memory.cache(total)
            cached_total([cached_make(i) for i in range(100)])
        else:
            cached = memory.cache(column_sum)
            sum(cached(namespace["df"], k) for k in range(8))
    else:
        from durable_monty_nb import Engine

        engine = Engine(f"sqlite:///{folder / 'store.db'}")
        if way == "durable-reused":
            code = EDITED[workload]
        start = time.perf_counter()
        engine.run(code, namespace, key=workload, rerun=way == "durable-rerun")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# In this order: a rerun's execution carries its "rerun" mark, so the same cell after it is not answered whole.
WAYS = ("plain", "joblib-first", "joblib-cached", "durable-first", "durable-stored", "durable-reused", "durable-rerun")


def run_child(workload: str, way: str, folder: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("DURABLE_MONTY_KEY", "benchmark")
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([workload, way, str(folder)])],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"{workload} {way} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=("arrays", "frame"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, way, folder = json.loads(args.child)
        print(MARK + json.dumps(child(workload, way, Path(folder))), flush=True)
        return
    print(f"# best of {args.repeat}, each run a fresh process; load average {os.getloadavg()[0]:.1f}")
    print(f"{'workload':<8} {'way':<15} {'best (s)':>9} {'runs (s)':<22} {'peak RSS':>9}")
    for workload in args.only or ["arrays", "frame"]:
        runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for _ in range(max(args.repeat, 1)):  # the ways in turn, round after round
            with tempfile.TemporaryDirectory(prefix="bench-values-") as tmp:
                for way in WAYS:  # the cached and stored runs follow their first run's folder
                    runs[way].append(run_child(workload, way, Path(tmp)))
        for way in WAYS:
            seconds = [r["seconds"] for r in runs[way]]
            listed = " ".join(f"{s:.3f}" for s in seconds)
            peak = max(r["rss_mb"] for r in runs[way])
            print(f"{workload:<8} {way:<15} {min(seconds):>9.3f} {listed:<22} {peak:>6.0f} MB", flush=True)


if __name__ == "__main__":
    main()
