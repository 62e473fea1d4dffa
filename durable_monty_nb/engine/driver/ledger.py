"""The call ledger: what the driver journals, what it reuses, and what it restores.

Every step's writes (results, new call rows, attempts about to be dispatched, the checkpoint
that names new calls) go to the store in one transaction before anything is dispatched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic_monty import MontyCrashedError

from ...errors import DurableError, StoreUnavailable
from ...store.store import Step, pending_call_row
from .. import sandbox
from .calls import RETRYING, CallState, CallStatus

if TYPE_CHECKING:
    from .loop import Driver

MAX_WORKER_CRASHES = 3


class Ledger:
    """Mixin of :class:`Driver`: the journal of calls and the store's view of them."""

    def _register(
        self: Driver, state: CallState, call_key: str, due_at: float | None = None, gather_id: int | None = None
    ) -> None:
        self.book.add(state)
        self._announced.append(state)
        row = pending_call_row(
            self.execution_id,
            state.call_id,
            state.function,
            state.fingerprint,
            state.args_text,
            call_key,
            kind=state.kind,
            due_at=due_at,
            gather_id=gather_id,
        )
        self.step.new_calls.append(row)
        self._new_rows[state.call_id] = row

    def _register_gathered(self: Driver, states: list[CallState], call_keys: list[str], gather_id: int) -> None:
        """The calls of a batched gather, registered together (as :meth:`_register` each)."""
        self.book.add_many(states)
        self._announced.extend(states)
        execution_id = self.execution_id
        rows = [
            pending_call_row(
                execution_id,
                state.call_id,
                state.function,
                state.fingerprint,
                state.args_text,
                key,
                gather_id=gather_id,
            )
            for state, key in zip(states, call_keys, strict=True)
        ]
        self.step.new_calls.extend(rows)
        self._new_rows.update(zip([s.call_id for s in states], rows, strict=True))

    # -- commits ------------------------------------------------------------------------------

    def _commit(self: Driver, blocked_snapshot: Any) -> None:
        step = self.step
        step.call_updates += self.book.take_journal()
        if self._announced and blocked_snapshot is not None:
            step.checkpoint = blocked_snapshot.dump()
            self._announced = []
            self._new_gathers = []
        if self._to_dispatch and self.executor.durable:
            self._journal_attempts()
        idle = not step and not self.codec.pending_blobs
        if idle and self.clock.now() - self._last_commit < self.settings.heartbeat:
            return
        self._write_step()

    def _write_step(self: Driver) -> None:
        """Commit the pending step (with the counters and any new blobs) and start a new one."""
        self.step.call_updates += self.book.take_journal()
        if self.codec.pending_blobs:  # merged: a step that failed to commit keeps its own
            self.step.blobs.update(self.codec.pending_blobs)
            self.codec.pending_blobs = {}
        self.step.execution.update(self._counter_columns())
        self.store.commit(self.execution_id, self.owner, self.settings.lease_ttl, self.step)
        self._last_commit = self.clock.now()
        self.step = Step()
        self._new_rows = {}

    def _commit_final(self: Driver) -> None:
        """The last write of this driver: it also releases the lease."""
        self._announced = []
        self.step.execution["lease_owner"] = None
        while True:
            try:
                self._write_step()
            except StoreUnavailable as exc:  # the result is kept in memory until the store is back
                self._ride_out(exc, collect=False)
                continue
            self._outage.recovered()
            return

    def _counter_columns(self: Driver) -> dict[str, int]:
        c = self.counters
        return {"calls_total": c.total, "calls_done": c.done, "calls_failed": c.failed, "calls_reused": c.reused}

    # -- reuse across executions of one key ---------------------------------------------------

    def _reuse_pending(self: Driver) -> bool:
        """Serve the announced calls that an earlier execution of the key completed.

        Returns True when at least one call got an answer.
        """
        states, self._to_reuse = self._to_reuse, []
        if not states:
            return False
        rows = self._new_rows
        found = self.store.reusable_results(self.reuse_key or "", [rows[s.call_id]["call_key"] for s in states])
        served = False
        for state in states:
            row = rows[state.call_id]
            hit = found.get(row["call_key"])
            if hit is None:
                self._to_dispatch.append(state)
                continue
            answer = {"return_value": self.codec.decode_sandbox(hit.result)}
            self.book.transition_pending_done(state, hit.result, answer, reused=True, journal=False)
            row.update(status="done", result=hit.result, reused_from=hit.execution_id, attempts=0)  # the new row
            served = True
        return served

    # -- restore ----------------------------------------------------------------------------

    def _restore_calls(self: Driver, rows: list[Any], retry_failed: bool) -> None:
        """Rebuild the ledger from the store's call rows (``Store.load_calls``), verifying outcomes.

        Calls without an outcome wait for :meth:`_attach_pending` (durable executors) or are
        dispatched again.
        """
        now = self.clock.now()
        verify = self.store.verify_call_fields
        restores = self.hooks.restore  # sleeps and signals wait again (waits.py)
        book, codec = self.book, self.codec
        unfinished = self._to_attach if self.executor.durable else self._to_dispatch
        for row in rows:  # unpacked: attribute access on 10,000 rows costs more than all the rest
            (
                call_id,
                function,
                kind,
                args,
                fingerprint,
                status,
                attempts,
                result,
                error,
                error_type,
                error_message,
                result_sig,
                due_at,
                started_at,
                finished_at,
                reused_from,
                worker,
                gather_id,
            ) = row
            if gather_id is not None:
                self._restore_gather(gather_id, call_id)
            if status in ("done", "failed"):
                verify(
                    self.execution_id, call_id, function, (status, result, error, error_type, error_message), result_sig
                )
            state = CallState(
                call_id,
                function,
                kind,
                args,
                True,
                fingerprint,
                None,
                CallStatus(status),
                attempts,
                result,
                error,
                error_type,
                error_message,
                due_at,
                started_at,
                finished_at,
                True,
                reused_from is not None,
                None,
                worker,
            )
            over = status == "done" or (status == "failed" and not retry_failed)
            book.restore(state, retry_failed=retry_failed, answer=state.journaled_answer(codec) if over else None)
            if over:
                continue
            if any(restore(state, now) for restore in restores):
                continue
            if status == "retrying" and due_at and due_at > now:
                self._push_timer(due_at, state)
            elif status == "failed":  # a fresh try after a fix (the book starts the policy over)
                self._to_dispatch.append(state)
            else:
                if state.status is RETRYING:  # its time came while nobody drove it
                    book.transition_retrying_pending(state)
                elif retry_failed:  # left going by the failed run (scheduling.py)
                    self._before_fix[call_id] = attempts + 1
                unfinished.append(state)
        if self._gathers:
            self._rearm_gathers()

    def _recover_from_crash(self: Driver, exc: MontyCrashedError) -> Any:
        """The sandbox worker died: reload the latest checkpoint in a new worker."""
        self._crashes += 1
        if self._crashes > MAX_WORKER_CRASHES:
            raise DurableError(f"the Monty worker crashed {self._crashes} times; last: {exc}") from exc
        announced = {s.call_id for s in self._announced}
        self.book.forget(announced)  # not checkpointed: Monty will announce them again
        self.step.new_calls = [r for r in self.step.new_calls if r["call_id"] not in announced]
        self._new_rows = {k: v for k, v in self._new_rows.items() if k not in announced}
        self._to_dispatch = [s for s in self._to_dispatch if s.call_id not in announced]
        self._to_reuse = []
        self._announced = []
        self._forget_new_gathers()
        self._commit(None)
        self._unshare_cpu()
        sandbox.close_session(self.session)
        self.session = sandbox.open_session()
        self._share_cpu()
        data = self.store.load_checkpoint(self.execution_id)
        for state in self.calls.values():
            answer = state.journaled_answer(self.codec)
            if answer is not None:
                self.answers[state.call_id] = answer
        self._rearm_gathers()
        if data is None:
            self.session.feed_start(sandbox.PRELUDE)
            return self.session.feed_start(self.info.fed, print_callback=self._print)
        return self.session.load_snapshot(data, print_callback=self._print)
