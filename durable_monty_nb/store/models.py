"""SQLAlchemy tables of a store (Core tables: the ORM is not needed, and importing it cost about a
third of the extension's import of SQLAlchemy). Timestamps are UNIX epoch seconds (float)."""

from __future__ import annotations

from sqlalchemy import Column, Double, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy.dialects import mysql

# MySQL's TEXT and BLOB stop at 64 KB; results and snapshots are bigger.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
LongBinary = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")

ID = String(32)

metadata = MetaData()


# One run of workflow code under a key, from start to completion or failure.
EXECUTIONS = Table(
    "dm_executions",
    metadata,
    Column("id", ID, primary_key=True),
    Column("key", String(255), nullable=False, index=True),
    Column("status", String(16), nullable=False),  # running | completed | failed | interrupted
    Column("code", LongText, nullable=False),
    Column("code_hash", String(64), nullable=False),
    Column("code_sig", String(64), nullable=False),
    Column("monty_version", String(32), nullable=False),
    # The rewrite of gathers Monty runs the code with (analysis.BATCHING); null: none (older rows)
    Column("batching", Integer),
    # JSON {"reads": {name: fingerprint}, "functions": {name: fingerprint}}
    Column("fingerprints", LongText),
    Column("result", LongText),
    Column("outputs", LongText),
    Column("result_sig", String(64)),
    Column("error", LongText),
    Column("error_type", String(255)),
    Column("calls_total", Integer, nullable=False, default=0),
    Column("calls_done", Integer, nullable=False, default=0),
    Column("calls_failed", Integer, nullable=False, default=0),
    Column("calls_reused", Integer, nullable=False, default=0),
    Column("lease_owner", String(255)),
    Column("lease_expires_at", Double),
    Column("previous_id", ID),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("finished_at", Double),
)


# The latest execution of each key; swapped with compare-and-set so racers agree.
KEYS = Table(
    "dm_keys",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("latest_execution_id", ID),
    Column("updated_at", Double, nullable=False),
)


# One external call of an execution, keyed by Monty's call_id.
CALLS = Table(
    "dm_calls",
    metadata,
    Column("execution_id", ID, ForeignKey("dm_executions.id"), primary_key=True),
    Column("call_id", Integer, primary_key=True, autoincrement=False),
    Column("function", String(255), nullable=False),
    Column("kind", String(8), nullable=False),  # call | sleep
    Column("fingerprint", String(64), nullable=False),
    Column("args", LongText, nullable=False),
    Column("call_key", String(64), nullable=False),
    Column("status", String(12), nullable=False),  # pending | retrying | done | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("result", LongText),
    Column("error", LongText),
    Column("error_type", String(255)),
    Column("error_message", LongText),
    Column("result_sig", String(64)),  # 32 hex digits (64 in rows before 0004)
    Column("due_at", Double),
    Column("reused_from", ID),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("worker", String(255)),  # where the last attempt ran (remote executors)
    Column("gather_id", Integer),  # the batched gather that announced it (Monty's call id)
    # Reuse looks calls up by call key, within the executions of one key (the row does not repeat
    # the key: in a notebook it is as long as the rest of the row's identifiers together).
    Index("ix_dm_calls_call_key", "call_key"),
)


# One attempt of a call on a durable executor (RQ, Dask).
#
# The driver inserts it as ``dispatched`` in the transaction of the checkpoint that names the
# call, before the job exists; the worker that runs it writes its outcome here, signed, so a
# result never depends on RQ's result TTL or on a Dask future staying referenced.
ATTEMPTS = Table(
    "dm_attempts",
    metadata,
    Column("attempt_id", String(80), primary_key=True),  # dm-<execution>-<call>-<attempt>
    Column("execution_id", ID, nullable=False, index=True),
    Column("call_id", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("executor", String(16), nullable=False),
    Column("status", String(12), nullable=False),  # dispatched | done | failed | lost
    Column("worker", String(255)),
    Column("result", LongText),
    Column("error_types", LongText),  # JSON list of qualified class names
    Column("error_message", LongText),
    Column("traceback", LongText),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("signature", String(64)),
    Column("created_at", Double, nullable=False),
)


# A notebook function pickled by value (cloudpickle) for remote workers, signed.
#
# Content-addressed: the key is the first 32 hex digits of the pickle's SHA-256.
FUNCTIONS = Table(
    "dm_functions",
    metadata,
    Column("key", ID, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("data", LongBinary, nullable=False),
    Column("signature", String(64), nullable=False),
    Column("created_at", Double, nullable=False),
)


# The latest Monty snapshot of an execution (signed, usually compressed).
CHECKPOINTS = Table(
    "dm_checkpoints",
    metadata,
    Column("execution_id", ID, ForeignKey("dm_executions.id"), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("data", LongBinary, nullable=False),
    Column("compression", String(8), nullable=False),
    Column("signature", String(64), nullable=False),
    Column("monty_version", String(32), nullable=False),
    Column("created_at", Double, nullable=False),
)


# A pickled host object, content-addressed (first 32 hex digits of its SHA-256).
BLOBS = Table(
    "dm_blobs",
    metadata,
    Column("key", ID, primary_key=True),
    Column("type_name", String(255), nullable=False),
    Column("size", Integer, nullable=False),
    Column("data", LongBinary, nullable=False),
    Column("signature", String(64), nullable=False),
    Column("created_at", Double, nullable=False),
)


# The mailbox of an execution: signals delivered to it, and completions of its external calls.
#
# ``seq`` orders the deliveries of one execution; a wait takes the oldest unconsumed one of its
# name and records its call id in ``consumed_by`` in the transaction that journals the call's
# result (see :mod:`durable_monty_nb.store.mailbox`). Signed like call results.
SIGNALS = Table(
    "dm_signals",
    metadata,
    Column("execution_id", ID, primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("name", String(255), nullable=False),
    Column("value", LongText, nullable=False),  # the value in the store's codec (tagged JSON)
    Column("idempotency_key", String(255)),
    Column("source", String(32), nullable=False),  # engine | magic | cli | http | widget
    Column("signature", String(64), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("consumed_by", Integer),  # the call id of the wait that took it
    Column("consumed_at", Double),
    Index("ix_dm_signals_waiting", "execution_id", "consumed_by", "name"),
    Index("ux_dm_signals_idempotency", "execution_id", "idempotency_key", unique=True),
)


# One completed durable unit of a pydantic-ai agent run inside a call (``durable_monty_nb.agents``):
# a model request, a tool call, a tool-list discovery or an event handled.
#
# Keyed by the call and ``unit_key`` (a hash of the run id, the operation name and the unit's place
# among the run's units of that name); ``attempt`` is the attempt of the call that ran it. When the
# call runs again (a retry, a resume), its agent run replays from these rows. Signed like call results.
AGENT_UNITS = Table(
    "dm_agent_units",
    metadata,
    Column("execution_id", ID, primary_key=True),
    Column("call_id", Integer, primary_key=True, autoincrement=False),
    Column("unit_key", String(64), primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("run_id", String(255), nullable=False),
    Column("name", String(255), nullable=False),  # the persisted operation name (NotebookDurability's namer)
    Column("kind", String(16), nullable=False),  # model | tool | discovery | event | capability
    Column("result", LongText, nullable=False),  # JSON of the unit's encoded result
    Column("signature", String(64), nullable=False),
    Column("created_at", Double, nullable=False),
)


# A detached execution handed over to runners (``durable-monty-nb runner``).
#
# What the kernel captured when it handed the run over: the executor's name, the run's options,
# the values of the names the code reads (the store's codec; objects as signed blobs) and the
# keys of its functions (shipped by value in ``dm_functions``), signed with the hand-over's
# identity. ``armed``: a runner should drive it (cleared when the run ends or is cancelled; a
# new hand-over of the cell sets it again). ``key_id`` names the signing key that signed it,
# so a runner with another key says so instead of calling it tampered.
HANDOFFS = Table(
    "dm_handoffs",
    metadata,
    Column("execution_id", ID, primary_key=True),
    Column("executor", String(64), nullable=False),
    Column("options", LongText, nullable=False),  # JSON
    Column("inputs", LongText, nullable=False),  # JSON {name: value in the store's codec}
    Column("functions", LongText, nullable=False),  # JSON {name: key in dm_functions}
    Column("signature", String(64), nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("armed", Integer, nullable=False),
    Column("cancel_requested_at", Double),
    Column("runner", String(255)),  # the runner that claimed it last
    Column("claimed_at", Double),
    Column("refusal", LongText),  # why a runner refused it (another signing key)
    # JSON of the live counts its runner sees (running, queued, ...; not signed: shown, never acted on)
    Column("progress", LongText),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
)
