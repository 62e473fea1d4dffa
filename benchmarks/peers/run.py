"""durable_monty_nb side by side with DBOS and python-durable: same workloads, interleaved, ratios.

    .venv/bin/python benchmarks/peers/run.py                    # set up the peers once, then measure
    .venv/bin/python benchmarks/peers/run.py --repeat 1 --only gather-1000
    .venv/bin/python benchmarks/peers/run.py --setup-only

Each peer gets its own virtual environment under the cache folder (``--cache``, default
``$DURABLE_MONTY_PEERS_CACHE`` or ``~/.cache/durable-monty-peers``; made once, reused):

- DBOS ``dbos==3.4.*`` on Python 3.11, SQLite system database;
- python-durable ``python-durable==0.2.3`` on Python 3.12 (it requires 3.12; found with pyenv or on
  the PATH, or ``--python312``). Its package imports ``redis`` unconditionally without requiring it,
  so the ``[redis]`` extra is installed too.

The workload scripts are written next to the environments. Every measurement runs in a fresh
subprocess with a fresh SQLite file in a temporary folder: the library starts (DBOS launches, our
engine starts, python-durable creates its tables), a 2-call warm-up workflow runs, then the
workload is timed with ``time.perf_counter`` around the workflow call and its result checked.
Runs are interleaved (repeat 1 of every library and workload, then repeat 2, ...) and the best of
``--repeat`` is printed, with the ratio peer / ours. A peer's run slower than ``--slow`` seconds is
not repeated; a run over ``--timeout`` is stopped and reported.

Workloads (``task(i) -> i*2``, a durable step each call):

- ``gather-1000``, ``gather-10000``: every call started at once, results gathered;
- ``sequential-1000``: one call awaited after the other.

Idioms: ours is ``await gather(*[task(i) ...])`` in the workflow code (``Engine.run``). DBOS: an
``async`` ``@DBOS.workflow()`` that starts ``async`` ``@DBOS.step()`` calls with
``asyncio.create_task`` in a deterministic order and awaits ``asyncio.gather`` (DBOS's documented
way to run steps concurrently); sequential is ``await task(i)`` in a loop. python-durable: a
``@wf.workflow`` awaiting ``asyncio.gather`` of ``@wf.task`` calls (step ids are assigned per call
in order), or awaiting them one by one. Library defaults otherwise (retries, SQLite pragmas).

Not part of the test suite (no ``test_`` names, outside ``tests/``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARK = "BENCH-RESULT "
WORKLOADS = {
    "gather-1000": ("gather", 1_000),
    "gather-10000": ("gather", 10_000),
    "sequential-1000": ("sequential", 1_000),
}

# -- workload scripts: argv = workload kind, n, folder; print MARK + {"seconds", "result", "rss_mb"} ----

COMMON = """\
import asyncio, json, resource, sys, time

kind, n, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
EXPECTED = n if kind == "gather" else sum(i * 2 for i in range(n))


def report(seconds, result):
    if result != EXPECTED:
        raise SystemExit(f"wrong result {result!r}, expected {EXPECTED!r}")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH-RESULT " + json.dumps({"seconds": seconds, "result": result, "rss_mb": rss_mb}), flush=True)
"""

OURS = (
    COMMON
    + """
import os
os.environ.setdefault("DURABLE_MONTY_KEY", "benchmark")
from durable_monty_nb import Engine

GATHER = "results = await gather(*[task(i) for i in range(n)])\\nlen(results)"
SEQUENTIAL = "total = 0\\nfor i in range(n):\\n    total = total + await task(i)\\ntotal"


def task(i):
    return i * 2


engine = Engine(f"{folder}/ours.db")
engine.run("1", {}, key="warm-up")  # the Monty pool and imports
engine.run(GATHER, {"task": task, "n": 2}, key="warm-up-calls")
code = GATHER if kind == "gather" else SEQUENTIAL
start = time.perf_counter()
result = engine.run(code, {"task": task, "n": n}, key="bench")
elapsed = time.perf_counter() - start
report(elapsed, result)
engine.close()
"""
)

DBOS = (
    COMMON
    + """
from dbos import DBOS

DBOS(config={"name": "peer-bench", "system_database_url": f"sqlite:///{folder}/dbos.sqlite", "log_level": "WARNING"})


@DBOS.step()
async def task(i: int) -> int:
    return i * 2


@DBOS.workflow()
async def gather_workflow(n: int) -> int:
    # steps started in a deterministic order, then awaited together
    tasks = [asyncio.create_task(task(i)) for i in range(n)]
    results = await asyncio.gather(*tasks)
    return len(results)


@DBOS.workflow()
async def sequential_workflow(n: int) -> int:
    total = 0
    for i in range(n):
        total += await task(i)
    return total


async def main():
    DBOS.launch()
    await gather_workflow(2)  # warm-up
    workflow = gather_workflow if kind == "gather" else sequential_workflow
    start = time.perf_counter()
    result = await workflow(n)
    elapsed = time.perf_counter() - start
    report(elapsed, result)
    DBOS.destroy()


asyncio.run(main())
"""
)

PYTHON_DURABLE = (
    COMMON
    + """
from durable import Workflow

wf = Workflow("peer-bench", db=f"sqlite:///{folder}/durable.db")


@wf.task
async def task(i: int) -> int:
    return i * 2


@wf.workflow(id="gather-{n}")
async def gather_workflow(n: int) -> int:
    results = await asyncio.gather(*[task(i) for i in range(n)])
    return len(results)


@wf.workflow(id="sequential-{n}")
async def sequential_workflow(n: int) -> int:
    total = 0
    for i in range(n):
        total += await task(i)
    return total


async def main():
    await gather_workflow(2)  # warm-up (creates the tables)
    workflow = gather_workflow if kind == "gather" else sequential_workflow
    start = time.perf_counter()
    result = await workflow(n)
    elapsed = time.perf_counter() - start
    report(elapsed, result)


asyncio.run(main())
"""
)


@dataclass
class Library:
    name: str
    script: str
    requirement: str | None = None  # None: ours, in this interpreter
    python: str | None = None  # the interpreter of its environment (set up by prepare)
    version: str = ""
    runs: dict[str, list[dict]] = field(default_factory=dict)


def find_python(version: str, given: str | None) -> str | None:
    """An interpreter of ``version`` (e.g. "3.12"): given, this one's base, pyenv, or the PATH."""
    if given:
        return given
    candidates: list[str] = []
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        candidates.append(getattr(sys, "_base_executable", sys.executable))
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True)
    candidates += [found for found in [shutil.which(f"python{version}")] if found]
    for candidate in candidates:
        try:
            out = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out == version:
            return candidate
    return None


def prepare(library: Library, cache: Path, base_python: str | None) -> None:
    """Make (once) the library's virtual environment and write its workload script."""
    folder = cache / library.name
    script = cache / f"{library.name}_workload.py"
    script.write_text(library.script)
    if library.requirement is None:
        library.python = sys.executable
        library.version = _ours_version()
        return
    python = folder / "bin" / "python"
    marker = folder / ".installed"
    if not (python.exists() and marker.exists() and marker.read_text() == library.requirement):
        if base_python is None:
            raise SystemExit(f"{library.name}: no suitable Python found (see --help for the options)")
        print(f"# setting up {library.name} ({library.requirement}) in {folder} with {base_python}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([base_python, "-m", "venv", str(folder)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", library.requirement], check=True
        )
        marker.write_text(library.requirement)
    library.python = str(python)
    distribution = library.requirement.split("[")[0].split("=")[0]
    library.version = subprocess.run(
        [
            str(python),
            "-c",
            f"import importlib.metadata as m, sys; "
            f"print(m.version({distribution!r}), '/ Python %d.%d.%d' % sys.version_info[:3])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _ours_version() -> str:
    try:
        import importlib.metadata as metadata

        version = metadata.version("durable-monty-nb")
    except Exception:
        version = "checkout"
    return f"{version} / Python {platform.python_version()}"


def run_one(library: Library, cache: Path, workload: str, timeout: float) -> dict:
    kind, n = WORKLOADS[workload]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix=f"peer-{library.name}-") as folder:
        try:
            done = subprocess.run(
                [library.python, str(cache / f"{library.name}_workload.py"), kind, str(n), folder],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=folder,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"over {timeout:.0f} s"}
    figures: dict = {"lock_retries": done.stderr.count("database is locked")}
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            figures.update(json.loads(line[len(MARK) :]))
            return figures
    last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
    figures["error"] = last[0][:160]
    return figures


def ratio(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="WORKLOAD", help=f"repeatable: {', '.join(WORKLOADS)}")
    parser.add_argument("--peers", default="dbos,python-durable", help="comma-separated (default: both)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best is printed (default 3)")
    parser.add_argument("--slow", type=float, default=60.0, help="a peer's run slower than this is not repeated")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument(
        "--cache",
        default=os.environ.get("DURABLE_MONTY_PEERS_CACHE", str(Path.home() / ".cache" / "durable-monty-peers")),
    )
    parser.add_argument("--python311", help="interpreter for the DBOS environment (default: found)")
    parser.add_argument("--python312", help="interpreter for the python-durable environment (default: found)")
    parser.add_argument("--setup-only", action="store_true", help="make the environments and stop")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures to FILE")
    args = parser.parse_args()

    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    workloads = [part for item in (args.only or list(WORKLOADS)) for part in item.split(",") if part]
    for workload in workloads:
        if workload not in WORKLOADS:
            parser.error(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    ours = Library("ours", OURS)
    available = {
        "dbos": (Library("dbos", DBOS, "dbos==3.4.*"), lambda: find_python("3.11", args.python311)),
        "python-durable": (
            Library("python-durable", PYTHON_DURABLE, "python-durable[redis]==0.2.3"),
            lambda: find_python("3.12", args.python312),
        ),
    }
    peers: list[Library] = []
    for name in filter(None, args.peers.split(",")):
        if name not in available:
            parser.error(f"unknown peer {name!r}; choose from {', '.join(available)}")
        library, finder = available[name]
        try:
            prepare(library, cache, finder())
        except (subprocess.CalledProcessError, SystemExit) as exc:
            print(f"# {name}: could not be set up ({exc}); left out", flush=True)
            continue
        peers.append(library)
    prepare(ours, cache, None)
    libraries = [ours, *peers]
    for library in libraries:
        print(f"# {library.name}: {library.version}  ({library.python})", flush=True)
    if args.setup_only:
        return

    print(
        f"# {platform.machine()}, {os.cpu_count()} cores; SQLite file stores; {args.repeat} interleaved rounds",
        flush=True,
    )
    for round_number in range(1, args.repeat + 1):
        for workload in workloads:
            for library in libraries:
                runs = library.runs.setdefault(workload, [])
                slow = [run for run in runs if "seconds" in run and run["seconds"] > args.slow]
                if any("error" in run for run in runs) or (library is not ours and slow):
                    continue  # failed or slow: not repeated
                figures = run_one(library, cache, workload, args.timeout)
                runs.append(figures)
                shown = f"{figures['seconds']:.3f} s" if "seconds" in figures else f"FAILED: {figures['error']}"
                retries = f", {figures['lock_retries']} 'database is locked'" if figures.get("lock_retries") else ""
                print(f"  round {round_number} {workload:<16} {library.name:<15} {shown}{retries}", flush=True)

    def best(library: Library, workload: str) -> float | None:
        times = [run["seconds"] for run in library.runs.get(workload, []) if "seconds" in run]
        return min(times) if times else None

    print()
    header = "| workload | ours (s) |" + "".join(f" {peer.name} (s) | {peer.name} / ours |" for peer in peers)
    print(header)
    print("|---|---:|" + "---:|---:|" * len(peers))
    for workload in workloads:
        mine = best(ours, workload)
        cells = [f"{mine:.3f}" if mine is not None else "failed"]
        for peer in peers:
            theirs = best(peer, workload)
            runs = peer.runs.get(workload, [])
            if theirs is None:
                cells += [f"failed ({runs[0]['error']})" if runs else "-", ""]
                continue
            count = len([run for run in runs if "seconds" in run])
            note = " (1 run)" if count == 1 and args.repeat > 1 else ""
            cells += [f"{theirs:.3f}{note}", ratio(theirs / mine) if mine else ""]
        print(f"| {workload} | " + " | ".join(cells) + " |")
    print()
    for library in libraries:
        for workload in workloads:
            runs = library.runs.get(workload, [])
            listed = ", ".join(
                f"{run['seconds']:.3f}" if "seconds" in run else f"failed ({run['error']})" for run in runs
            )
            peaks = [run["rss_mb"] for run in runs if "rss_mb" in run]
            peak = f"; peak RSS {max(peaks):.0f} MB" if peaks else ""
            locked = sum(run.get("lock_retries", 0) for run in runs)
            extra = f"; 'database is locked' retries: {locked}" if locked else ""
            print(f"# {library.name:<15} {workload:<16} runs (s): {listed}{peak}{extra}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({lib.name: {"version": lib.version, "runs": lib.runs} for lib in libraries}, indent=1)
        )


if __name__ == "__main__":
    main()
