"""Workflows run in subprocesses by the crash and race tests.

Every notebook function appends a line to a side-effect log (``SIDE_LOG``) when it starts,
so a test can prove which calls ran in which process. A call named in ``BLOCK`` (an
environment variable such as ``work:10-19,step:3``) blocks forever after logging: the process is then
killed with the call in flight.
"""

from __future__ import annotations

import os
import threading

from durable_monty_nb import retry

_forever = threading.Event()


def _log(entry: str) -> None:
    path = os.environ["SIDE_LOG"]
    with open(path, "a") as handle:
        handle.write(f"{os.getpid()} {entry}\n")
        handle.flush()
        os.fsync(handle.fileno())


def _maybe_block(kind: str, i: int) -> None:
    """Block forever if BLOCK (e.g. ``work:10-19,step:3``) names this call."""
    for item in filter(None, os.environ.get("BLOCK", "").split(",")):
        name, _, span = item.partition(":")
        low, _, high = span.partition("-")
        if name == kind and int(low) <= i <= int(high or low):
            _forever.wait()


def work(i: int) -> int:
    _log(f"work {i}")
    _maybe_block("work", i)
    return i * 10


def step(i: int) -> int:
    _log(f"step {i}")
    _maybe_block("step", i)
    return i + 1


@retry(retries=2, backoff="constant", delay=float(os.environ.get("RETRY_DELAY", "0.2")))
def flaky(i: int) -> int:
    """Fails on its first three invocations across all processes (counted in the log)."""
    _log(f"flaky {i}")
    path = os.environ["SIDE_LOG"]
    with open(path) as handle:
        tries = sum(1 for line in handle if line.split(" ", 1)[1].strip() == f"flaky {i}")
    if tries <= 3:
        raise ConnectionError(f"attempt {tries} failed")
    return i


SCENARIOS = {
    "gather": (
        "results = await gather(*[work(i) for i in range(n)])\nsum(results)",
        {"n": 20},
    ),
    "gather_tasks": (  # the same fan-out announced call by call (a list built before the gather)
        "tasks = [work(i) for i in range(n)]\nresults = await gather(*tasks)\nsum(results)",
        {"n": 20},
    ),
    "two_gathers": (  # the second gather reads the first's results (both batched)
        "tens = await gather(*[work(i) for i in range(n)])\nresults = await gather(*[step(t) for t in tens])\n"
        "sum(results)",
        {"n": 20},
    ),
    "sequential": (
        "total = 0\nfor i in range(6):\n    total = total + await step(i)\ntotal",
        {},
    ),
    "retry": (
        "try:\n    r = await flaky(1)\nexcept OSError as e:\n    r = 'gave up: ' + str(e)\nr",
        {},
    ),
    "sleepy": (
        "import asyncio\nimport time\nawait step(0)\nawait asyncio.sleep(s)\nawait step(1)\ntime.sleep(s)\n"
        "await step(2)\n'slept'",
        {"s": 3.0},
    ),
}


def namespace(name: str) -> dict[str, object]:
    _code, values = SCENARIOS[name]
    return {"work": work, "step": step, "flaky": flaky, **values}


def gated(log: str, gate: str, i: int) -> int:
    """For executors in other processes, where BLOCK is not set: logs to ``log``, then waits
    until the file ``gate`` exists (the test creates it to let the calls finish)."""
    import time

    with open(log, "a") as handle:
        handle.write(f"{os.getpid()} gated {i}\n")
        handle.flush()
        os.fsync(handle.fileno())
    while not os.path.exists(gate):
        time.sleep(0.01)
    return i * 10


SCENARIOS["gated"] = ("results = await gather(*[gated(log, gate, i) for i in range(n)])\nsum(results)", {"n": 6})
