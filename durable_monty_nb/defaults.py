"""Defaults shared by the engine, the executors, the magics and the command line (one place each)."""

from __future__ import annotations

WORKERS = 32
"""Threads per execution for notebook functions (the ``threads`` executor)."""

LEASE_TTL = 30.0
"""Seconds before another process may take over an execution whose owner went silent."""

EXECUTOR = "threads"
"""Where notebook functions run: ``threads``, ``rq`` or ``dask``."""

RQ_QUEUE = "durable-monty"
"""The RQ queue durable calls go to (``rq worker durable-monty``)."""

INLINE_LIMIT = 64 * 1024
"""Arguments and results larger than this (bytes of stored text) travel through the store's
signed blobs, never through Redis or the Dask scheduler."""

STORE_RETRY_WINDOW = 10.0
"""Seconds one store operation is retried through transient errors (a dropped connection, a
deadlock, a locked SQLite file) before it raises ``StoreUnavailable``."""

STORE_OUTAGE_LIMIT = 300.0
"""Seconds a running execution waits for an unreachable store (keeping its results in memory)
before it stops as interrupted."""

DURABILITY = "full"
"""How far a committed step survives: ``full`` (every step is on disk before the calls it names
are dispatched: survives a power cut) or ``process`` (survives the kernel's crash, not the
machine's; SQLite WAL with ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit=off``)."""

DURABILITY_LEVELS = ("full", "process")

SQLITE_BUSY_TIMEOUT = 5.0
"""Seconds SQLite waits for another writer's lock before the store's own retries take over."""

SWITCH_INTERVAL = 0.0005
"""Seconds between the interpreter's forced thread switches while workflows run beside a thread
that keeps the GIL (Python's own default is 0.005): the driver gives up the GIL about ten times a
step, and each time it waits up to one interval for it. None leaves Python's setting alone."""

RETENTION = None
"""Automatic retention (``Engine(retention="30d")``, ``%config DurableMagics.retention``): off.
When set, completed executions older than that are pruned (the latest of each workflow kept)."""

RETENTION_EVERY = 3600.0
"""Seconds between two automatic prunes of one engine (the first comes with its first run)."""
