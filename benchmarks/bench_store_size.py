"""Bytes per call row of a 10,000-call gather in a SQLite store (after VACUUM), by table and index.

``python benchmarks/bench_store_size.py [N]``: the store is a fresh file; the key is a notebook-like
one (``analysis/report.ipynb::cell-...``) as a notebook's cells get. Needs SQLite's ``dbstat``.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile

from durable_monty_nb import Engine

KEY = "analysis/report.ipynb::cell-3f2a9c1e5b7d"  # a notebook path and a cell id, as %%durable keys a cell


def task(i: int) -> int:
    return i * 2


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    path = os.path.join(tempfile.mkdtemp(), "size.db")
    engine = Engine(path)
    engine.run(f"await gather(*[task(i) for i in range({n})])", {"task": task}, key=KEY)
    engine.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    rows = conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall()
    calls = sum(
        size for name, size in rows if name.endswith("dm_calls_1") or name.startswith(("dm_calls", "ix_dm_calls"))
    )
    for name, size in rows[:5]:
        print(f"{name:32s} {size:>10,d} bytes  {size / n:7.1f} per call")
    print(f"call rows with their indexes: {calls / n:.0f} bytes per call; store file {os.path.getsize(path):,d} bytes")
    conn.close()


if __name__ == "__main__":
    main()
