"""The store's tables by name, and the status of an execution being deleted: what the store and
its retention (``retention.py``) share."""

from __future__ import annotations

from .models import (
    AGENT_UNITS,
    ATTEMPTS,
    BLOBS,
    CALLS,
    CHECKPOINTS,
    EXECUTIONS,
    FUNCTIONS,
    HANDOFFS,
    KEYS,
)

__all__ = [
    "AGENT_UNITS",
    "ATTEMPTS",
    "BLOBS",
    "CALLS",
    "CHECKPOINTS",
    "DELETING",
    "EXECUTIONS",
    "FUNCTIONS",
    "HANDOFFS",
    "KEYS",
]

DELETING = "deleting"  # marked by a prune or forget whose batches delete its rows (see retention.py)
