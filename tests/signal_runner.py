"""A workflow that waits for a signal, run in a process of its own by test_signals.py.

``python signal_runner.py DB_URL KEY [COUNT]``: runs (or resumes) the workflow; prints
``RESULT <json>``. Side effects go to $SIDE_LOG (``<pid> <entry>``); ``record`` holds while
$GATE_FILE exists and ``step`` while $STEP_GATE does (test scaffolding: a call in flight at the kill).
"""

from __future__ import annotations

import json
import os
import sys
import time

from durable_monty_nb import Engine

CODE = """
first = await step("a")
got = await signal("go")
second = await record(got)
[first, got, second]
"""
MANY = """
values = []
for i in range(count):
    values.append(await signal("n"))
values
"""


def log(entry: str) -> None:
    with open(os.environ["SIDE_LOG"], "a") as handle:
        handle.write(f"{os.getpid()} {entry}\n")


def step(x):
    log(f"step {x}")
    gate = os.environ.get("STEP_GATE", "")
    while gate and os.path.exists(gate):  # held while the test holds the gate: in flight before the wait
        time.sleep(0.01)
    return x


def record(value):
    log(f"record {json.dumps(value)}")
    gate = os.environ.get("GATE_FILE", "")
    while gate and os.path.exists(gate):  # held while the test holds the gate
        time.sleep(0.01)
    return "recorded"


def main() -> int:
    url, key = sys.argv[1], sys.argv[2]
    engine = Engine(url, lease_ttl=1.5)  # heartbeat 0.5 s: deliveries of other processes seen quickly
    if len(sys.argv) > 3:
        run = engine.start(MANY, {"count": int(sys.argv[3])}, key=key)
    else:
        run = engine.start(CODE, {"step": step, "record": record}, key=key)
    print("STARTED", run.execution_id, flush=True)
    print("RESULT", json.dumps(run.result(120)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
