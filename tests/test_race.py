"""Two processes on one store never drive one execution at the same time."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from procs import finish, kill, log_entries, spawn, wait_until

from durable_monty_nb import Engine
from durable_monty_nb.store.store import Store


def test_two_processes_resuming_one_crashed_execution(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "side.log"
    store = Store(db_url)
    crashed = spawn(db_url, "gather", log, block="work:10-19")
    wait_until(
        lambda: (row := store.latest_execution("gather")) is not None and row.calls_done == 10,
        what="10 committed results",
        procs=(crashed,),
    )
    kill(crashed)

    # Both race to take over the dead owner's lease; the winner blocks on work(15), so it is
    # still alive (and holds the lease) when the loser looks.
    racers = [spawn(db_url, "gather", log, mode="resume", block="work:15") for _ in range(2)]
    busy = wait_until(lambda: [p for p in racers if p.poll() is not None], what="one racer to give up")
    assert len(busy) == 1
    loser = busy[0]
    winner = next(p for p in racers if p is not loser)
    code, out, _ = finish(loser)
    assert code == 3 and "BUSY" in out and f"being driven by process {winner.pid}" in out
    # It says how long until take-over and how to wait for or take over the run.
    assert re.search(r"lease runs for \d+ s more", out) and "%durable_status gather" in out
    assert "stop that process" in out
    wait_until(
        lambda: "work 15" in [e for pid, e in log_entries(log) if pid == winner.pid],
        what="the winner to reach work 15",
        procs=(winner,),
    )
    kill(winner)

    entries = log_entries(log)
    assert not [e for pid, e in entries if pid == loser.pid], "the loser ran calls"
    assert sorted(e for pid, e in entries if pid == winner.pid) == sorted(f"work {i}" for i in range(10, 20))

    final = spawn(db_url, "gather", log, mode="resume")
    code, out, err = finish(final)
    assert code == 0 and "RESULT 1900" in out, err
    # Only work(15), in flight when the winner died, ran a third time.
    assert [e for pid, e in log_entries(log) if pid == final.pid] == ["work 15"]


def test_two_processes_starting_one_key(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "side.log"
    racers = [spawn(db_url, "gather", log, block="work:0") for _ in range(2)]
    busy = wait_until(lambda: [p for p in racers if p.poll() is not None], what="one racer to give up")
    assert len(busy) == 1
    loser = busy[0]
    code, out, err = finish(loser)
    assert code == 3 and "BUSY" in out, err
    winner = next(p for p in racers if p is not loser)
    wait_until(
        lambda: len([1 for pid, _ in log_entries(log) if pid == winner.pid]) == 20,
        what="the winner to start its calls",
        procs=(winner,),
    )
    kill(winner)
    entries = log_entries(log)
    assert not [e for pid, e in entries if pid == loser.pid]
    assert sorted(e for _, e in entries) == sorted(f"work {i}" for i in range(20))
    store = Store(db_url)
    assert len(store.list_executions(key="gather")) == 1


def test_a_resume_that_read_the_execution_before_another_process_finished_it_returns_the_stored_result(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease of a finished execution is free, as a crashed one's: a resume that read the row
    while it still ran, and takes the lease after it completed, must not drive it again."""
    release, ran = threading.Event(), []

    def work(i):
        ran.append(i)
        if i == 2:
            release.wait(30)
        return i * 10

    code = "sum(await gather(*[work(i) for i in range(4)]))"
    first = Engine(sqlite_url)
    run = first.start(code, {"work": work}, key="raced")
    store = Store(sqlite_url)
    wait_until(lambda: store.latest_execution("raced").calls_done == 3, what="3 of 4 calls done")
    stale = store.find_execution("raced")  # read while it still runs
    release.set()
    assert run.result(30) == 60
    finished = store.find_execution("raced")
    first.close()

    second = Engine(sqlite_url)
    monkeypatch.setattr(second.store, "find_execution", lambda name: stale)  # as read before it finished
    resumed = second.resume("raced", {"work": work})
    assert resumed.result(30) == 60 and resumed.cached  # the stored result, nothing driven
    assert sorted(ran) == [0, 1, 2, 3]  # no call ran again
    after = store.find_execution("raced")
    assert (after.status, after.finished_at, after.calls_done) == ("completed", finished.finished_at, 4)
    second.close()
