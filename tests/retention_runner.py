"""A second process on the store of tests/test_retention.py: ``python retention_runner.py DB_URL START GATE``.

Once the file START exists (the test's own executions of ``live`` have run by then), runs the
workflow ``live``: arrays equal to those the test's own executions stored (the same blobs), half
of them held back until the file GATE exists, so the execution is running (its lease held, some
results committed) while the test prunes and forgets around it. Prints ``RESULT <json>`` (the
sums and the arrays' first elements) on success.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from durable_monty_nb import Engine

LIVE_CODE = "xs = await gather(*[make(i) for i in items])\nys = [await total(x) for x in xs]\n(ys, xs)"


def wait_for(path: Path, seconds: float = 120) -> None:
    """Until the test creates the file (or ``seconds`` passed)."""
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> int:
    url, start, gate = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    def make(i: int) -> np.ndarray:
        if i >= 2:
            wait_for(gate)
        return np.full(2000, i, dtype=np.int64)

    def total(x: np.ndarray) -> int:
        return int(x.sum())

    engine = Engine(url, lease_ttl=5.0)
    wait_for(start)
    run = engine.start(LIVE_CODE, {"make": make, "total": total, "items": [0, 1, 2, 3]}, key="live")
    print("STARTED", run.execution_id, flush=True)
    ys, xs = run.result()
    print("RESULT", json.dumps({"sums": ys, "first": [int(x[0]) for x in xs], "sizes": [len(x) for x in xs]}))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
