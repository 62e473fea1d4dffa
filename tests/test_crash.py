"""Kill -9 a process at several points of a workflow and resume it in a new process.

The side-effect log proves that no call whose result was committed runs again; only the
calls in flight at the kill run twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from procs import finish, kill, log_entries, spawn, wait_until

from durable_monty_nb.store.store import Store


def execution(store: Store, key: str):
    return store.latest_execution(key)


def done_args(store: Store, key: str) -> set[int]:
    row = store.latest_execution(key)
    return {json.loads(c.args)[0][0] for c in store.load_calls(row.id) if c.status == "done"}


@pytest.mark.parametrize("scenario", ["gather", "gather_tasks"])  # one host call / call by call
def test_kill_mid_gather_then_resume(db_url: str, tmp_path: Path, scenario: str) -> None:
    log = tmp_path / "side.log"
    store = Store(db_url)
    first = spawn(db_url, scenario, log, block="work:10-19")
    wait_until(
        lambda: (
            (row := execution(store, scenario)) is not None and row.calls_done == 10 and len(log_entries(log)) == 20
        ),
        what="10 committed results and 10 calls in flight",
        procs=(first,),
    )
    kill(first)

    committed = done_args(store, scenario)
    assert committed == set(range(10))
    assert execution(store, scenario).status == "running"  # as the dead process left it
    gathered = {c.gather_id is not None for c in store.load_calls(execution(store, scenario).id)}
    assert gathered == {scenario == "gather"}

    second = spawn(db_url, scenario, log)  # running the same code again resumes it
    code, out, err = finish(second)
    assert code == 0, err
    assert "RESULT 1900" in out

    rerun = [entry for pid, entry in log_entries(log) if pid == second.pid]
    assert sorted(rerun) == sorted(f"work {i}" for i in range(10, 20))  # only the calls in flight
    row = execution(store, scenario)
    assert row.status == "completed" and row.calls_done == 20
    assert row.lease_owner is None


def test_kill_in_a_second_batched_gather_reruns_neither_gathers_done_calls(sqlite_url: str, tmp_path: Path) -> None:
    """The first gather was answered before the kill: the resume rebuilds it from the store
    (its calls are not run again), and of the second only the calls in flight run again."""
    log = tmp_path / "side.log"
    store = Store(sqlite_url)
    first = spawn(sqlite_url, "two_gathers", log, block="step:0-50")  # steps of 0, 10, ..., 50 block
    wait_until(
        lambda: (
            (row := execution(store, "two_gathers")) is not None
            and row.calls_done == 34
            and len(log_entries(log)) == 40
        ),
        what="20 + 14 committed results and 6 calls in flight",
        procs=(first,),
    )
    kill(first)

    second = spawn(sqlite_url, "two_gathers", log)
    code, out, err = finish(second)
    assert code == 0, err
    assert f"RESULT {sum(i * 10 + 1 for i in range(20))}" in out
    rerun = [entry for pid, entry in log_entries(log) if pid == second.pid]
    assert sorted(rerun) == sorted(f"step {t}" for t in range(0, 60, 10))
    rows = store.load_calls(execution(store, "two_gathers").id)
    assert len(rows) == 40 and len({r.gather_id for r in rows}) == 2


def test_kill_between_sequential_steps(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "side.log"
    store = Store(db_url)
    first = spawn(db_url, "sequential", log, block="step:3")
    wait_until(lambda: "step 3" in [e for _, e in log_entries(log)], what="step 3 to start", procs=(first,))
    kill(first)
    assert done_args(store, "sequential") == {0, 1, 2}

    second = spawn(db_url, "sequential", log, mode="resume")
    code, out, err = finish(second)
    assert code == 0, err
    assert "RESULT 21" in out
    assert [e for pid, e in log_entries(log) if pid == second.pid] == ["step 3", "step 4", "step 5"]


def test_kill_during_retry_backoff_continues_the_schedule(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "side.log"
    store = Store(db_url)
    env = {"RETRY_DELAY": "1.5"}
    first = spawn(db_url, "retry", log, env=env)

    def in_second_backoff() -> bool:
        row = execution(store, "retry")
        calls = store.load_calls(row.id) if row else []
        return bool(calls) and calls[0].status == "retrying" and calls[0].attempts == 2

    wait_until(in_second_backoff, what="the backoff after attempt 2", procs=(first,))
    kill(first)
    due_at = store.load_calls(execution(store, "retry").id)[0].due_at

    second = spawn(db_url, "retry", log, env=env)
    code, out, err = finish(second)
    assert code == 0, err
    # The restart continued at attempt 3, the last one: the function's third failure is final.
    # (Starting the schedule over would have made 3 more attempts and succeeded on the 4th.)
    assert "RESULT 'gave up: attempt 3 failed'" in out
    assert [e for _, e in log_entries(log)] == ["flaky 1"] * 3
    call = store.load_calls(execution(store, "retry").id)[0]
    assert call.status == "failed" and call.attempts == 3
    assert call.started_at >= due_at  # the resumed process waited out the persisted backoff


def test_durable_sleeps_survive_a_kill_with_the_remaining_time(sqlite_url: str, tmp_path: Path) -> None:
    """``await asyncio.sleep(3)``, then ``time.sleep(3)``: the process is killed during each, and
    resumed when most of the time has passed. The sleep keeps the deadline stored before the kill
    (never a fresh 3 s from the restart), and ends no earlier than it."""
    log, store = tmp_path / "side.log", Store(sqlite_url)

    def pending_sleep(function: str) -> Any:
        row = execution(store, "sleepy")
        found = [c for c in store.load_calls(row.id) if c.function == function] if row else []
        return found[0] if found and found[0].status == "pending" and found[0].due_at else None

    proc = spawn(sqlite_url, "sleepy", log)
    for function in ("asyncio.sleep", "time.sleep"):
        sleep = wait_until(lambda f=function: pending_sleep(f), what=f"{function} to be journaled", procs=(proc,))
        kill(proc)  # the moment chosen: the sleep is stored with its deadline, and runs
        wait_until(lambda due=sleep.due_at: time.time() >= due - 0.5, timeout=10, what="most of the sleep to pass")
        proc = spawn(sqlite_url, "sleepy", log)  # the same cell again: resumes
        assert proc.stdout is not None and proc.stdout.readline().startswith("STARTED")
        resumed_at = time.time()  # the execution is loaded and driven (however long the process took to start)
        woke = wait_until(
            lambda f=function: next(
                (c for c in store.load_calls(execution(store, "sleepy").id) if c.function == f and c.status == "done"),
                None,
            ),
            what=f"{function} to end",
            procs=(proc,),
        )
        assert woke.due_at == sleep.due_at  # the stored deadline, not a new one
        # It ends at the stored deadline (or at once, past it), never a fresh 3 s after the resume.
        assert sleep.due_at <= woke.finished_at < max(sleep.due_at, resumed_at) + 1.5
    code, out, err = finish(proc)
    assert code == 0, err
    assert "RESULT 'slept'" in out
    assert [e for _, e in log_entries(log)] == ["step 0", "step 1", "step 2"]  # nothing ran twice
