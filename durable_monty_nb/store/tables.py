"""The store's tables by name, and the status of an execution being deleted: what the store and
its retention (``retention.py``) share."""

from __future__ import annotations

from .models import AgentUnit, Attempt, Blob, Call, Checkpoint, Execution, Function, Handoff, Key

EXECUTIONS = Execution.__table__
CALLS = Call.__table__
CHECKPOINTS = Checkpoint.__table__
BLOBS = Blob.__table__
KEYS = Key.__table__
ATTEMPTS = Attempt.__table__
FUNCTIONS = Function.__table__
AGENT_UNITS = AgentUnit.__table__
HANDOFFS = Handoff.__table__

DELETING = "deleting"  # marked by a prune or forget whose batches delete its rows (see retention.py)
