"""SQLAlchemy tables of a store. Timestamps are UNIX epoch seconds (float)."""

from __future__ import annotations

from sqlalchemy import Double, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# MySQL's TEXT and BLOB stop at 64 KB; results and snapshots are bigger.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
LongBinary = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")

ID = String(32)


class Base(DeclarativeBase):
    pass


class Execution(Base):
    """One run of workflow code under a key, from start to completion or failure."""

    __tablename__ = "dm_executions"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(16))  # running | completed | failed | interrupted
    code: Mapped[str] = mapped_column(LongText)
    code_hash: Mapped[str] = mapped_column(String(64))
    code_sig: Mapped[str] = mapped_column(String(64))
    monty_version: Mapped[str] = mapped_column(String(32))
    # The rewrite of gathers Monty runs the code with (analysis.BATCHING); null: none (older rows)
    batching: Mapped[int | None] = mapped_column(Integer)
    # JSON {"reads": {name: fingerprint}, "functions": {name: fingerprint}}
    fingerprints: Mapped[str | None] = mapped_column(LongText)
    result: Mapped[str | None] = mapped_column(LongText)
    outputs: Mapped[str | None] = mapped_column(LongText)
    result_sig: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(LongText)
    error_type: Mapped[str | None] = mapped_column(String(255))
    calls_total: Mapped[int] = mapped_column(Integer, default=0)
    calls_done: Mapped[int] = mapped_column(Integer, default=0)
    calls_failed: Mapped[int] = mapped_column(Integer, default=0)
    calls_reused: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[float | None] = mapped_column(Double)
    previous_id: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)


class Key(Base):
    """The latest execution of each key; swapped with compare-and-set so racers agree."""

    __tablename__ = "dm_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    latest_execution_id: Mapped[str | None] = mapped_column(ID)
    updated_at: Mapped[float] = mapped_column(Double)


class Call(Base):
    """One external call of an execution, keyed by Monty's call_id."""

    __tablename__ = "dm_calls"

    execution_id: Mapped[str] = mapped_column(ID, ForeignKey("dm_executions.id"), primary_key=True)
    call_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    function: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(8))  # call | sleep
    fingerprint: Mapped[str] = mapped_column(String(64))
    args: Mapped[str] = mapped_column(LongText)
    call_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(12))  # pending | retrying | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[str | None] = mapped_column(LongText)
    error: Mapped[str | None] = mapped_column(LongText)
    error_type: Mapped[str | None] = mapped_column(String(255))
    error_message: Mapped[str | None] = mapped_column(LongText)
    result_sig: Mapped[str | None] = mapped_column(String(64))  # 32 hex digits (64 in rows before 0004)
    due_at: Mapped[float | None] = mapped_column(Double)
    reused_from: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[float] = mapped_column(Double)
    started_at: Mapped[float | None] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)
    worker: Mapped[str | None] = mapped_column(String(255))  # where the last attempt ran (remote executors)
    gather_id: Mapped[int | None] = mapped_column(Integer)  # the batched gather that announced it (Monty's call id)

    # Reuse looks calls up by call key, within the executions of one key (the row does not repeat
    # the key: in a notebook it is as long as the rest of the row's identifiers together).
    __table_args__ = (Index("ix_dm_calls_call_key", "call_key"),)


class Attempt(Base):
    """One attempt of a call on a durable executor (RQ, Dask).

    The driver inserts it as ``dispatched`` in the transaction of the checkpoint that names the
    call, before the job exists; the worker that runs it writes its outcome here, signed, so a
    result never depends on RQ's result TTL or on a Dask future staying referenced.
    """

    __tablename__ = "dm_attempts"

    attempt_id: Mapped[str] = mapped_column(String(80), primary_key=True)  # dm-<execution>-<call>-<attempt>
    execution_id: Mapped[str] = mapped_column(ID, index=True)
    call_id: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    executor: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(12))  # dispatched | done | failed | lost
    worker: Mapped[str | None] = mapped_column(String(255))
    result: Mapped[str | None] = mapped_column(LongText)
    error_types: Mapped[str | None] = mapped_column(LongText)  # JSON list of qualified class names
    error_message: Mapped[str | None] = mapped_column(LongText)
    traceback: Mapped[str | None] = mapped_column(LongText)
    started_at: Mapped[float | None] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)
    signature: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double)


class Function(Base):
    """A notebook function pickled by value (cloudpickle) for remote workers, signed.

    Content-addressed: the key is the first 32 hex digits of the pickle's SHA-256.
    """

    __tablename__ = "dm_functions"

    key: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LongBinary)
    signature: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double)


class Checkpoint(Base):
    """The latest Monty snapshot of an execution (signed, usually compressed)."""

    __tablename__ = "dm_checkpoints"

    execution_id: Mapped[str] = mapped_column(ID, ForeignKey("dm_executions.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LongBinary)
    compression: Mapped[str] = mapped_column(String(8))
    signature: Mapped[str] = mapped_column(String(64))
    monty_version: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[float] = mapped_column(Double)


class Blob(Base):
    """A pickled host object, content-addressed (first 32 hex digits of its SHA-256)."""

    __tablename__ = "dm_blobs"

    key: Mapped[str] = mapped_column(ID, primary_key=True)
    type_name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LongBinary)
    signature: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double)


class Signal(Base):
    """The mailbox of an execution: signals delivered to it, and completions of its external calls.

    ``seq`` orders the deliveries of one execution; a wait takes the oldest unconsumed one of its
    name and records its call id in ``consumed_by`` in the transaction that journals the call's
    result (see :mod:`durable_monty_nb.store.mailbox`). Signed like call results.
    """

    __tablename__ = "dm_signals"

    execution_id: Mapped[str] = mapped_column(ID, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(LongText)  # the value in the store's codec (tagged JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(32))  # engine | magic | cli | http | widget
    signature: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double)
    consumed_by: Mapped[int | None] = mapped_column(Integer)  # the call id of the wait that took it
    consumed_at: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        Index("ix_dm_signals_waiting", "execution_id", "consumed_by", "name"),
        Index("ux_dm_signals_idempotency", "execution_id", "idempotency_key", unique=True),
    )


class AgentUnit(Base):
    """One completed durable unit of a pydantic-ai agent run inside a call (``durable_monty_nb.agents``):
    a model request, a tool call, a tool-list discovery or an event handled.

    Keyed by the call and ``unit_key`` (a hash of the run id, the operation name and the unit's place
    among the run's units of that name); ``attempt`` is the attempt of the call that ran it. When the
    call runs again (a retry, a resume), its agent run replays from these rows. Signed like call results.
    """

    __tablename__ = "dm_agent_units"

    execution_id: Mapped[str] = mapped_column(ID, primary_key=True)
    call_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    unit_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))  # the persisted operation name (NotebookDurability's namer)
    kind: Mapped[str] = mapped_column(String(16))  # model | tool | discovery | event | capability
    result: Mapped[str] = mapped_column(LongText)  # JSON of the unit's encoded result
    signature: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double)


class Handoff(Base):
    """A detached execution handed over to runners (``durable-monty-nb runner``).

    What the kernel captured when it handed the run over: the executor's name, the run's options,
    the values of the names the code reads (the store's codec; objects as signed blobs) and the
    keys of its functions (shipped by value in ``dm_functions``), signed with the hand-over's
    identity. ``armed``: a runner should drive it (cleared when the run ends or is cancelled; a
    new hand-over of the cell sets it again). ``key_id`` names the signing key that signed it,
    so a runner with another key says so instead of calling it tampered.
    """

    __tablename__ = "dm_handoffs"

    execution_id: Mapped[str] = mapped_column(ID, primary_key=True)
    executor: Mapped[str] = mapped_column(String(64))
    options: Mapped[str] = mapped_column(LongText)  # JSON
    inputs: Mapped[str] = mapped_column(LongText)  # JSON {name: value in the store's codec}
    functions: Mapped[str] = mapped_column(LongText)  # JSON {name: key in dm_functions}
    signature: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(16))
    armed: Mapped[int] = mapped_column(Integer)
    cancel_requested_at: Mapped[float | None] = mapped_column(Double)
    runner: Mapped[str | None] = mapped_column(String(255))  # the runner that claimed it last
    claimed_at: Mapped[float | None] = mapped_column(Double)
    refusal: Mapped[str | None] = mapped_column(LongText)  # why a runner refused it (another signing key)
    # JSON of the live counts its runner sees (running, queued, ...; not signed: shown, never acted on)
    progress: Mapped[str | None] = mapped_column(LongText)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
