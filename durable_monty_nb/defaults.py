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
