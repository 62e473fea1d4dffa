"""The call book alone: no Monty, no database, no threads.

Every way a call gets done goes through one transition (answer, counter, journal); transitions
from the wrong status are refused; the counters other threads read are one consistent copy.
"""

from __future__ import annotations

import pytest

from durable_monty_nb.engine.driver.book import (
    DONE,
    FAILED,
    PENDING,
    RETRYING,
    CallBook,
    CallStatus,
    Counters,
    IllegalTransition,
)
from durable_monty_nb.engine.driver.calls import CallState


def call(call_id: int, kind: str = "call", **fields: object) -> CallState:
    return CallState(call_id, "f" if kind == "call" else "asyncio.sleep", kind, "[[1],{}]", True, **fields)  # type: ignore[arg-type]


def test_a_call_goes_from_pending_through_retrying_to_done_and_is_journaled_each_time() -> None:
    book = CallBook()
    state = call(1)
    book.add(state)
    assert book.snapshot() == Counters(total=1)
    book.transition_pending_retrying(state, 10.0, error_text="Traceback ...\nOSError: flaky", error_type="OSError")
    assert state.status is RETRYING and book.snapshot().retrying == 1
    book.transition_retrying_pending(state)
    book.transition_pending_done(state, "42", {"return_value": 42})
    assert state.status is DONE and state.error_text is None and state.due_at is None
    assert book.answers == {1: {"return_value": 42}}
    assert book.snapshot() == Counters(total=1, done=1)
    journal = book.take_journal()
    assert [(row["call_id"], row["status"]) for row in journal] == [(1, "retrying"), (1, "done")]
    assert all(type(row["status"]) is str for row in journal)  # plain text for every database driver
    assert book.take_journal() == []  # taken once


@pytest.mark.parametrize("way", ["reused", "restored", "returned", "slept", "signalled"])
def test_every_way_of_being_done_answers_counts_and_journals_alike(way: str) -> None:
    book = CallBook()
    state = call(7, "sleep" if way == "slept" else "call")
    if way == "restored":
        state.status, state.result_text = DONE, "5"
        book.restore(state, retry_failed=False, answer={"return_value": 5})
    else:
        book.add(state)
        book.transition_pending_done(state, "5", {"return_value": 5}, reused=way == "reused", journal=way != "reused")
    counters = book.snapshot()
    assert state.status is DONE and book.answers[7] == {"return_value": 5}
    assert (counters.total, counters.done, counters.waiting) == (1, 1, 0)
    assert counters.reused == (way == "reused") and counters.restored == (way == "restored")
    assert len(book.take_journal()) == (0 if way in ("reused", "restored") else 1)  # their rows say so already


def test_a_failure_is_answered_counted_and_remembered_by_its_error() -> None:
    book = CallBook()
    state = call(3)
    book.add(state)
    answer = {"exc_type": "ValueError", "message": "bad"}
    book.transition_pending_failed(state, "ValueError", "bad", "Traceback ...\nValueError: bad", 5.0, answer)
    assert state.status is FAILED and state.finished_at == 5.0 and book.answers[3] == answer
    assert book.failed_by_error[("ValueError", "bad")] is state
    assert book.snapshot().failed == 1
    book.transition_failed_pending(state)  # the cell ran again after a fix
    assert state.status is PENDING and book.snapshot().failed == 0


def test_transitions_from_the_wrong_status_are_refused() -> None:
    book = CallBook()
    state = call(1)
    book.add(state)
    book.transition_pending_done(state, "1", {"return_value": 1})
    with pytest.raises(IllegalTransition, match="call 1 \\(f\\) is done, not pending"):
        book.transition_pending_done(state, "1", {"return_value": 1})  # done twice: counted twice
    with pytest.raises(IllegalTransition):
        book.transition_retrying_pending(state)
    assert book.snapshot().done == 1


def test_restore_rebuilds_the_counters_of_the_stored_rows() -> None:
    book = CallBook()
    rows = [
        call(1, status=CallStatus("done"), result_text="1"),
        call(2, status=CallStatus("failed"), error_type="KeyError", error_message="k", attempts=3),
        call(3, status=CallStatus("retrying"), due_at=99.0),
        call(4, "sleep", status=CallStatus("pending"), due_at=50.0),
    ]
    for state in rows:
        book.restore(state, retry_failed=False, answer={"return_value": 1} if state.call_id == 1 else None)
    assert book.snapshot() == Counters(total=4, done=1, failed=1, restored=1, retrying=1, waiting=1)
    assert [s.status for s in rows] == [DONE, FAILED, RETRYING, PENDING]
    again = CallBook()
    failed = call(2, status=CallStatus("failed"), attempts=3)
    again.restore(failed, retry_failed=True)  # a fresh try: pending, its earlier attempts not counted by the policy
    assert failed.status is PENDING and failed.policy_attempts == 0 and again.snapshot().failed == 0


def test_forgotten_calls_leave_no_count_and_no_answer() -> None:
    book = CallBook()
    kept, reused, sleeping = call(1), call(2), call(3, "sleep")
    for state in (kept, reused, sleeping):
        book.add(state)
    book.transition_pending_done(reused, "2", {"return_value": 2}, reused=True, journal=False)
    book.forget({2, 3})  # announced, never checkpointed: the sandbox crashed
    assert book.snapshot() == Counters(total=1)
    assert set(book.calls) == {1} and book.answers == {}


def test_calls_of_a_batched_gather_are_added_together_and_only_as_pending() -> None:
    book = CallBook()
    book.add_many([call(i) for i in range(3)])
    assert sorted(book.calls) == [0, 1, 2] and book.snapshot() == Counters(total=3)
    with pytest.raises(IllegalTransition):
        book.add_many([call(3), call(4, status=DONE)])
    assert sorted(book.calls) == [0, 1, 2]  # none of a refused batch is added


def _walked(book: CallBook) -> list[int]:
    """The unfinished calls as a walk over every call finds them (what live views used to do)."""
    return [s.call_id for s in book.calls.values() if s.status is not DONE and s.status is not FAILED]


def test_the_unfinished_calls_are_kept_in_call_order_through_every_transition() -> None:
    book = CallBook()
    states = [call(i) for i in range(8)]
    book.add_many(states[:5])
    book.add(states[5])
    book.restore(call(6, status="done", result_text="1"), retry_failed=False)
    book.restore(call(7, status="retrying"), retry_failed=False)
    assert [s.call_id for s in book.unfinished_states()] == _walked(book) == [0, 1, 2, 3, 4, 5, 7]
    book.transition_pending_done(states[1], "1", {"return_value": 1})
    book.transition_pending_failed(states[2], "ValueError", "bad", "Traceback", 1.0, {"error": "bad"})
    book.transition_pending_failed(states[3], "ValueError", "bad", "Traceback", 1.0, {"error": "bad"})
    book.transition_pending_retrying(states[4], 5.0)
    assert [s.call_id for s in book.unfinished_states()] == _walked(book) == [0, 4, 5, 7]
    book.transition_failed_pending(states[3])  # tried again: back in its place, not at the end
    assert [s.call_id for s in book.unfinished_states()] == _walked(book) == [0, 3, 4, 5, 7]
    book.forget({5})
    assert [s.call_id for s in book.unfinished_states()] == _walked(book) == [0, 3, 4, 7]
    for state in (states[0], states[3]):
        book.transition_pending_done(state, "1", {"return_value": 1})
    book.transition_retrying_pending(states[4])
    book.transition_pending_done(states[4], "1", {"return_value": 1})
    assert [s.call_id for s in book.unfinished_states()] == _walked(book) == [7]
    book.transition_failed_pending(states[2])
    assert [s.call_id for s in book.unfinished_states()] == _walked(book) == [2, 7]
