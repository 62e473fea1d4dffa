"""End-to-end figures through ``%%durable`` in a fresh IPython shell, as issue 8's targets are defined.

    python benchmarks/bench_ipython.py                          # every workload, best of 3
    python benchmarks/bench_ipython.py --only gather-10000 --only sequential-1000
    python benchmarks/bench_ipython.py --repeat 5 --repeat-large 1
    python benchmarks/bench_ipython.py --warm            # after a one-call cell (engine, store, Monty up)

Every measurement runs in its own subprocess: a fresh ``InteractiveShell`` loads the extension on
a fresh SQLite file store (a temporary folder), defines ``task(i) -> i*2`` and ``n``, and times the
workload cell with ``time.perf_counter`` around ``run_cell`` (loading the extension and defining
the function are not timed; the first ``%%durable`` cell is, with everything it starts). The cell
runs with ``--quiet`` so the progress view's cost is not measured, except in ``gather-10000-view``.
Peak RSS is the child's ``ru_maxrss`` after the cell.

Workloads:

- ``gather-1000``, ``gather-10000``, ``gather-100000``: ``await gather(*[task(i) for i in range(n)])``
- ``sequential-1000``: ``total = total + await task(i)`` in a loop
- ``sequential-1000-process``: the same with ``--durability process``
- ``resume-10000``: a child runs the 10,000-call gather with the second half of the calls blocked;
  once the first half is committed (``dm_calls`` rows ``done``, polled from this process) it is
  killed (SIGKILL). A fresh shell then times ``%durable_resume NAME --quiet`` to completion.
- ``gather-10000-view``: the 10,000-call gather with the (text) progress view on.

Beside each figure, the floor this machine allows today (``floor.py``: the same body in bare
Monty, fed as the driver feeds it, a gathered comprehension as one host call, plus one bare
SQLite commit per sequential step) and what we add above it, per call. For sequential steps,
``design``: the same Monty steps and commits in one loop, each answer handed to another thread
and back (``floor.stepped_seconds``): what this design costs with no Python of the driver's own.
Figures, not assertions. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = "BENCH-RESULT "
NAME = "bench"

TASK = """\
import os as _os, threading as _threading
_never = _threading.Event()
_block_from = int(_os.environ.get("BENCH_BLOCK_FROM", "-1"))

def task(i):
    if 0 <= _block_from <= i:
        _never.wait()
    return i * 2
"""

GATHER = "results = await gather(*[task(i) for i in range(n)])\nlen(results)"
SEQUENTIAL = "total = 0\nfor i in range(n):\n    total = total + await task(i)\ntotal"

# name: (cell body, n, expected result, quiet)
WORKLOADS: dict[str, tuple[str, int, int, bool]] = {
    "gather-1000": (GATHER, 1_000, 1_000, True),
    "gather-10000": (GATHER, 10_000, 10_000, True),
    "gather-100000": (GATHER, 100_000, 100_000, True),
    "sequential-1000": (SEQUENTIAL, 1_000, sum(i * 2 for i in range(1_000)), True),
    "sequential-1000-process": (SEQUENTIAL, 1_000, sum(i * 2 for i in range(1_000)), True),
    "resume-10000": (GATHER, 10_000, 10_000, True),
    "gather-10000-view": (GATHER, 10_000, 10_000, False),
}
OPTIONS = {"sequential-1000-process": " --durability process"}
LARGE = {"gather-100000"}


# -- the child: one fresh shell ------------------------------------------------------------


def child(spec: dict[str, Any]) -> None:
    """Run one measurement in this (fresh) process and print its figures as one JSON line."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "durable_monty_nb")
    ready = shell.run_cell(TASK + f"n = {spec['n']}\n", store_history=False)
    ready.raise_error()
    if spec.get("warm"):  # the store, the engine and Monty started before the timed cell
        shell.run_cell("%%durable --quiet warm-up\nawait task(0)", store_history=False).raise_error()
    quiet = (" --quiet" if spec["quiet"] else "") + OPTIONS.get(spec["name"], "")
    resume = f"%durable_resume {NAME}{quiet}"
    cell = resume if spec["mode"] == "resume" else f"%%durable {NAME}{quiet}\n{spec['body']}"
    start = time.perf_counter()
    result = shell.run_cell(cell)
    elapsed = time.perf_counter() - start
    result.raise_error()
    if result.result != spec["expected"]:
        raise SystemExit(f"wrong result: {result.result!r}, expected {spec['expected']!r}")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(MARK + json.dumps({"seconds": elapsed, "rss_mb": rss_mb}), flush=True)
    os._exit(0)  # no teardown: a 100,000-call namespace is not the workload


# -- the parent: subprocesses ----------------------------------------------------------------


def child_env(folder: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["DURABLE_MONTY_DB"] = f"sqlite:///{folder / 'bench.db'}"
    env.setdefault("DURABLE_MONTY_KEY", "benchmark")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def child_command(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]


def measure(spec: dict[str, Any], folder: Path, timeout: float) -> dict[str, float]:
    done = subprocess.run(
        child_command(spec), env=child_env(folder), cwd=folder, capture_output=True, text=True, timeout=timeout
    )
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(
        f"{spec['name']}: the child failed (exit {done.returncode})\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def done_calls(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM dm_calls WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:  # no table yet, or busy
        return 0


def kill_halfway(spec: dict[str, Any], folder: Path, timeout: float) -> int:
    """Start the run with its second half blocked; SIGKILL it once the first half is committed."""
    half = spec["n"] // 2
    started = {**spec, "mode": "cell", "quiet": True}
    proc = subprocess.Popen(
        child_command(started),
        env=child_env(folder, BENCH_BLOCK_FROM=str(half)),
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = folder / "bench.db"
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the run to kill exited early:\n{proc.stderr.read()[-3000:]}")
            count = done_calls(db)
            if count >= half:
                break
            if count != last:
                last, since = count, time.monotonic()
            elif count >= 0.9 * half and time.monotonic() - since > 2.0:
                break  # about half, and no more progress
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {count} of {half} calls committed after {timeout:.0f} s")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()  # reaped: the store sees its lease owner dead
        proc.stderr.close()
    return done_calls(db)


def floor_seconds(name: str, timeout: float) -> dict[str, float] | None:
    """The floor of a workload (see floor.py), measured in a fresh process: ``seconds``, and for
    sequential steps ``design`` (the same steps in one loop with a thread hand-off each: this
    design's floor); None for resumes."""
    if name.startswith("resume-"):
        return None
    body, n, _, _ = WORKLOADS[name]
    steps = n if name.startswith("sequential-") else 1
    synchronous = "NORMAL" if "process" in OPTIONS.get(name, "") else "FULL"
    script = (
        "import floor, json\n"
        f"figures = {{'seconds': floor.sandbox_seconds({body!r}, {n}) "
        f"+ floor.commit_seconds({steps}, {synchronous!r})}}\n"
    )
    if name.startswith("sequential-"):
        script += f"figures['design'] = floor.stepped_seconds({body!r}, {n}, {synchronous!r}, hand_off=True)\n"
    script += f"print({MARK!r} + json.dumps(figures))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=timeout
    )
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"{name}: the floor failed\n{done.stderr[-3000:]}")


def run_once(name: str, timeout: float, warm: bool = False) -> dict[str, float]:
    body, n, expected, quiet = WORKLOADS[name]
    spec = {"name": name, "body": body, "n": n, "expected": expected, "quiet": quiet, "mode": "cell", "warm": warm}
    with tempfile.TemporaryDirectory(prefix="bench-ipython-") as tmp:
        folder = Path(tmp)
        figures: dict[str, float] = {}
        if name.startswith("resume-"):
            figures["committed"] = kill_halfway(spec, folder, timeout)
            spec["mode"] = "resume"
        figures.update(measure(spec, folder, timeout))
        floor = floor_seconds(name, timeout)
        if floor is not None:
            figures["floor"] = floor["seconds"]
            if "design" in floor:
                figures["design"] = floor["design"]
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", action="append", metavar="NAME", help=f"a workload (repeatable): {', '.join(WORKLOADS)}"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload; the best is printed (default 3)")
    parser.add_argument("--repeat-large", type=int, help="runs of gather-100000 (default: --repeat)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one child may take")
    parser.add_argument("--warm", action="store_true", help="run a one-call %%%%durable cell before the timed one")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures to FILE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    names = [part for item in (args.only or list(WORKLOADS)) for part in item.split(",") if part]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")

    import platform

    print(
        f"# %%durable in a fresh IPython shell, SQLite file store, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores; best of {args.repeat} (gather-100000: {args.repeat_large or args.repeat})"
        + ("; after a warm-up cell" if args.warm else "; the first %%durable cell of the shell")
    )
    header = (
        f"{'workload':<24} {'calls':>7} {'best (s)':>9} {'runs (s)':<23} {'µs/call':>8} {'peak RSS':>9} "
        f"{'floor (s)':>9} {'ours-floor µs/call':>19} {'design (s)':>10}"
    )
    print(header)
    print("-" * len(header))
    every: dict[str, list[dict[str, float]]] = {}
    for name in names:
        repeat = (args.repeat_large or args.repeat) if name in LARGE else args.repeat
        runs = [run_once(name, args.timeout, args.warm) for _ in range(max(repeat, 1))]
        every[name] = runs
        best = min(runs, key=lambda figures: figures["seconds"])
        n = WORKLOADS[name][1]
        calls = n - int(best["committed"]) if "committed" in best else n
        listed = " ".join(f"{figures['seconds']:.3f}" for figures in runs)
        per_call = best["seconds"] / calls * 1e6
        peak = max(figures["rss_mb"] for figures in runs)
        note = f"   ({int(best['committed'])} committed before the kill)" if "committed" in best else ""
        floors = [figures["floor"] for figures in runs if "floor" in figures]
        floor, above = "", ""
        if floors:
            floor = f"{min(floors):.3f}"
            above = f"{(best['seconds'] - min(floors)) / calls * 1e6:.1f}"
        designs = [figures["design"] for figures in runs if "design" in figures]
        design = f"{min(designs):.3f}" if designs else ""
        print(
            f"{name:<24} {calls:>7} {best['seconds']:>9.3f} {listed:<23} {per_call:>8.1f} {peak:>6.0f} MB "
            f"{floor:>9} {above:>19} {design:>10}{note}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(every, indent=1))


if __name__ == "__main__":
    main()
