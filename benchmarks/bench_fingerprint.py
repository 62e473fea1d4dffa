"""What fingerprinting costs on big values: a function that reads a 400 MB DataFrame.

    python benchmarks/bench_fingerprint.py              # 400 MB, best of 5
    python benchmarks/bench_fingerprint.py --mb 100 --repeat 3

Prints, best of ``--repeat`` (seconds):

- ``first pass``: a new :class:`Fingerprinter` (one run) fingerprints the function: the frame's
  blocks are hashed in place (XXH3-128 over pickle protocol 5 buffers, no copy);
- ``same pass, second function``: another function of the same run reads the same frame: it is
  hashed once per run, so this is the cost of describing the function only;
- ``after an in-place edit``: one cell changed, a new pass: the fingerprint differs (checked);
- for scale: ``pickle.dumps`` of the frame (what storing it as a value costs) and SHA-256 of that;
- other shapes: a string column, a long list, a big dict, a list of small dicts (these go through
  the pickle element by element, so they cost more per byte than numeric blocks).

Figures, not assertions. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import resource
import time
import tracemalloc
from typing import Any

import numpy as np
import pandas as pd

from durable_monty_nb.engine.fingerprint import Fingerprinter


def best(repeat: int, work: Any) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=400, help="size of the DataFrame in MB (default 400)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the best is printed (default 5)")
    args = parser.parse_args()
    frame_figures(args)
    shape_figures(args)


def frame_figures(args: argparse.Namespace) -> None:
    columns = 10
    rows = args.mb * 1_000_000 // 8 // columns
    frame = pd.DataFrame(np.random.default_rng(0).random((rows, columns)), columns=[f"c{i}" for i in range(columns)])
    namespace: dict[str, Any] = {"DF": frame}
    exec("def score(x):\n    return float(DF['c0'].iloc[x])\ndef other(x):\n    return DF.shape[0] + x", namespace)
    score, other = namespace["score"], namespace["other"]
    size = frame.memory_usage(index=True).sum() / 1e6
    print(f"DataFrame: {rows:,} rows x {columns} float64 columns, {size:.0f} MB")

    first = best(args.repeat, lambda: Fingerprinter().function(score))

    def two_functions() -> None:
        printer = Fingerprinter()
        printer.function(score)
        started = time.perf_counter()
        printer.function(other)
        two_functions.second = time.perf_counter() - started  # type: ignore[attr-defined]

    seconds = []
    for _ in range(args.repeat):
        two_functions()
        seconds.append(two_functions.second)  # type: ignore[attr-defined]
    tracemalloc.start()
    Fingerprinter().function(score)
    allocated = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    before = Fingerprinter().function(score).digest
    frame.iloc[rows // 2, 3] = -1.0
    edited = best(args.repeat, lambda: Fingerprinter().function(score))
    changed = Fingerprinter().function(score).digest != before
    dumped = best(max(1, args.repeat // 2), lambda: pickle.dumps(frame, protocol=5))
    data = pickle.dumps(frame, protocol=5)
    sha = best(max(1, args.repeat // 2), lambda: hashlib.sha256(data).hexdigest())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"first pass (one run fingerprints score):   {first * 1000:8.1f} ms  ({size / first / 1000:.1f} GB/s)")
    print(f"same pass, second function reading DF:     {min(seconds) * 1000:8.3f} ms")
    print(f"after an in-place edit, new pass:          {edited * 1000:8.1f} ms  (fingerprint changed: {changed})")
    print(f"for scale: pickle.dumps(DF):               {dumped * 1000:8.1f} ms")
    print(f"for scale: sha256 of that pickle:          {sha * 1000:8.1f} ms")
    print(f"memory allocated while fingerprinting:     {allocated:8.3f} MB  (the frame is not copied)")
    print(f"peak RSS of the benchmark: {peak:.0f} MB (building the frame, then its {size:.0f} MB pickle)")


def shape_figures(args: argparse.Namespace) -> None:
    print("other shapes (first pass):")
    for label, value in (
        ("DataFrame, 1M-row string column", pd.DataFrame({"s": [f"item-{i}" for i in range(1_000_000)]})),
        ("list of 1M ints", list(range(1_000_000))),
        ("dict of 1M str -> int", {f"k{i}": i for i in range(1_000_000)}),
        ("list of 100k small dicts", [{"i": i, "name": f"n{i}"} for i in range(100_000)]),
    ):
        scope: dict[str, Any] = {"V": value}
        exec("def read(x):\n    return V", scope)
        seconds = best(args.repeat, lambda scope=scope: Fingerprinter().function(scope["read"]))
        print(f"  {label + ':':40} {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
