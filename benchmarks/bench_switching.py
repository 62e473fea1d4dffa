"""A workflow beside a notebook function that runs pure Python, with and without a lower switch interval.

    python benchmarks/bench_switching.py

Two figures, each in fresh processes, best of 3:

1. In a fresh IPython shell, ``%%durable`` runs ``await gather(cpu_bound(), pipeline())``, where the
   pipeline makes 200 sequential awaits of a trivial function and ``cpu_bound`` spins in pure Python
   until the pipeline is done. Printed: how long the 200 awaits took, for Python's own switch interval
   (``DurableMagics.switch_interval = None``), 1 ms, and the default (``defaults.SWITCH_INTERVAL``).
2. The price: the same pure-Python work split over 4 threads (no workflow), at Python's 5 ms and at the
   lower intervals.

Figures, not assertions. See durable_monty_nb/engine/driver/switching.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from durable_monty_nb import defaults

MARK = "BENCH-RESULT "

WORKFLOW = r"""
import json, os, sys, tempfile, time
os.chdir(tempfile.mkdtemp())
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "durable_monty_nb")
shell.run_line_magic("config", f"DurableMagics.switch_interval = {sys.argv[1]}")
shell.run_cell('''
import threading, time
stamps, done = [], threading.Event()
def quick(i):
    stamps.append(time.perf_counter())
    if i == 199:
        done.set()
    return i * 2
def cpu_bound():
    x = 0
    while not done.is_set():
        x += 1
    return x
''')
result = shell.run_cell('''%%durable beside --quiet
async def pipeline():
    total = 0
    for i in range(200):
        total = total + await quick(i)
    return total
both = await gather(cpu_bound(), pipeline())
both[1]
''')
assert result.result == 39800, result.result
stamps = shell.user_ns["stamps"]
print("BENCH-RESULT " + json.dumps({"seconds": stamps[-1] - stamps[0]}), flush=True)
"""

PRICE = r"""
import json, sys, threading, time
sys.setswitchinterval(float(sys.argv[1]))
def spin():
    x = 0
    for _ in range(20_000_000):
        x += 1
threads = [threading.Thread(target=spin) for _ in range(4)]
start = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
print("BENCH-RESULT " + json.dumps({"seconds": time.perf_counter() - start}), flush=True)
"""


def best(script: str, argument: str, repeat: int = 3) -> float:
    figures = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run(
                [sys.executable, "-c", script, argument], cwd=folder, capture_output=True, text=True, timeout=600
            )
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        if not lines:
            raise SystemExit(f"the run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        figures.append(json.loads(lines[0][len(MARK) :])["seconds"])
    return min(figures)


def main() -> None:
    ours = defaults.SWITCH_INTERVAL
    print("200 sequential awaits beside a pure-Python call (best of 3):")
    for label, value in (
        ("Python's 5 ms (None)", "None"),
        ("1 ms", "0.001"),
        (f"{ours * 1000:g} ms (default)", repr(ours)),
    ):
        print(f"  switch interval {label:<22} {best(WORKFLOW, value):7.2f} s", flush=True)
    print("The price: 80 million pure-Python loop steps over 4 threads, no workflow (best of 3):")
    for label, value in (("Python's 5 ms", "0.005"), ("1 ms", "0.001"), (f"{ours * 1000:g} ms", repr(ours))):
        print(f"  switch interval {label:<22} {best(PRICE, value):7.2f} s", flush=True)


if __name__ == "__main__":
    main()
