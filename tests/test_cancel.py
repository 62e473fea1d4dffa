"""Cancel stops a gather: queued calls are withdrawn, running ones finish and are kept, the run
ends interrupted and resumable; a resume runs only the rest.

Calls log their start to a side-effect log and wait for a gate file, so a test knows exactly
which calls started before and after the cancel (no sleeps standing in for synchronization).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from procs import wait_until

from durable_monty_nb import Engine, ExecutionInterrupted

GATHER = "results = await gather(*[gated(log, gate, i) for i in range(n)])\nsum(results)"


def gated_function():
    """A notebook-style function (it reaches remote workers by value): log the start, wait for the gate."""

    def gated(log, gate, i):
        import os
        import time

        with open(log, "a") as handle:
            handle.write(f"{i}\n")
        while not os.path.exists(gate):
            time.sleep(0.01)
        return i * 10

    return gated


def started(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def test_cancel_withdraws_the_queued_calls_of_a_gather_on_threads(sqlite_url: str, tmp_path: Path) -> None:
    log, gate = tmp_path / "started.log", tmp_path / "gate"
    engine = Engine(sqlite_url, workers=2)
    ns = {"gated": gated_function(), "log": str(log), "gate": str(gate), "n": 40}
    run = engine.start(GATHER, ns, key="fanout")
    wait_until(lambda: run.progress.running == 2 and len(started(log)) == 2, what="2 calls running")
    assert run.progress.queued == 38

    run.cancel()
    gate.touch()  # the two running calls may finish now
    assert run.wait(30)
    assert run.status == "interrupted"
    with pytest.raises(ExecutionInterrupted):
        run.result()
    first = started(log)
    assert len(first) == 2, f"calls started after the cancel: {first}"
    row = engine.store.latest_execution("fanout")
    assert row.status == "interrupted" and row.calls_done == 2 and row.calls_total == 40

    again = engine.resume("fanout", ns)
    assert again.result(60) == sum(i * 10 for i in range(40))
    rest = started(log)[2:]
    assert sorted(rest) == sorted(set(range(40)) - set(first))  # only the rest ran, each once
    assert again.progress.restored == 2
    engine.close()


def test_durable_cancel_stops_a_background_gather_in_ipython(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setenv("DURABLE_MONTY_DB", f"sqlite:///{tmp_path / 'cancel.db'}")
    log, gate = tmp_path / "started.log", tmp_path / "gate"
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "durable_monty_nb")
    try:
        ip.user_ns.update(gated=gated_function(), log=str(log), gate=str(gate), n=40)
        assert ip.run_cell(f"%%durable fan --background --workers 2 --quiet\n{GATHER}").success
        run = _magics(ip).runs["fan"]
        wait_until(lambda: run.progress.running == 2 and len(started(log)) == 2, what="2 calls running")
        assert ip.run_cell("%durable_cancel fan").success
        gate.touch()
        assert run.wait(30) and run.status == "interrupted"
        assert len(started(log)) == 2
        resumed = ip.run_cell("%durable_resume fan --quiet")
        assert resumed.success
        assert sorted(started(log)) == list(range(40))  # the rest ran, each once
        assert ip.user_ns["results"] == [i * 10 for i in range(40)]
    finally:
        ip.run_line_magic("unload_ext", "durable_monty_nb")


def _magics(ip):
    from durable_monty_nb.notebook.magics import _MAGICS

    return _MAGICS[id(ip)]


def test_cancel_withdraws_queued_jobs_on_rq_workers(redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    from test_rq import Workers

    from durable_monty_nb.executors.base import attempt_id
    from durable_monty_nb.executors.rq import RQ

    workers = Workers(redis_url, f"q-{tmp_path.name[-20:]}", {})
    workers.start(2)
    try:
        from redis import Redis

        redis = Redis.from_url(redis_url)
        log, gate = tmp_path / "started.log", tmp_path / "gate"
        engine = Engine(sqlite_url, executor=RQ(workers.url, workers.queue))
        ns = {"gated": gated_function(), "log": str(log), "gate": str(gate), "n": 40}
        run = engine.start(GATHER, ns, key="rq-fanout")
        wait_until(lambda: len(started(log)) == 2, what="2 calls running on the 2 workers", timeout=60)

        run.cancel()
        assert run.wait(30) and run.status == "interrupted"
        assert redis.llen(f"rq:queue:{workers.queue}") == 0  # every queued job withdrawn: none can start
        gate.touch()
        attempts = [attempt_id(run.execution_id, call.call_id, 1) for call in run.calls()]
        wait_until(
            lambda: sum(record.finished for record in engine.store.load_attempts(attempts).values()) == 2,
            what="the two running calls finished, their outcomes in the store",
        )
        assert len(started(log)) == 2

        again = engine.resume("rq-fanout", ns)
        assert again.result(120) == sum(i * 10 for i in range(40))
        assert sorted(started(log)) == list(range(40))  # the rest ran once, the first two were kept
        engine.close()
    finally:
        workers.stop()


@pytest.mark.kernel
def test_ctrl_c_on_a_foreground_gather_withdraws_its_queued_calls(tmp_path: Path) -> None:
    from kernels import Kernel

    from durable_monty_nb.store.store import Store

    log, gate, db = tmp_path / "started.log", tmp_path / "gate", f"sqlite:///{tmp_path / 'kernel.db'}"
    kernel = Kernel(tmp_path, {"DURABLE_MONTY_DB": db})
    try:
        kernel.ok("%load_ext durable_monty_nb")
        kernel.ok(
            "import os, time\n\ndef gated(i):\n"
            f"    with open({str(log)!r}, 'a') as handle:\n        handle.write(f'{{i}}\\n')\n"
            f"    while not os.path.exists({str(gate)!r}):\n        time.sleep(0.01)\n    return i * 10\n"
            "n = 40"
        )
        msg_id = kernel.submit(
            f"%%durable fan --workers 2 --quiet\n{GATHER.replace('gated(log, gate, i)', 'gated(i)')}"
        )
        wait_until(lambda: len(started(log)) == 2, what="2 calls running")
        kernel.manager.interrupt_kernel()
        assert kernel.collect(msg_id).error == "ExecutionInterrupted"
        gate.touch()
        store = Store(db)
        wait_until(lambda: store.latest_execution("fan").status == "interrupted", what="the run to end interrupted")
        assert len(started(log)) == 2  # the 38 queued calls never started
        assert kernel.ok("%durable_resume fan --quiet").result == str(sum(i * 10 for i in range(40)))
        assert sorted(started(log)) == list(range(40))
    finally:
        kernel.close()


def test_cancel_of_a_run_waiting_on_an_external_call_ends_it_and_the_completion_is_taken_on_resume(
    sqlite_url: str,
) -> None:
    """An external call goes on outside the kernel: Cancel does not wait for it (it may take days);
    its completion, sent after the cancel, is taken when the run resumes."""
    import queue

    from durable_monty_nb import external
    from durable_monty_nb.signals import complete_call

    published: queue.Queue = queue.Queue()

    @external(hook=published.put)
    def render(x: int) -> str:
        raise AssertionError("an external function never runs in the kernel")

    engine = Engine(sqlite_url)
    ns = {"render": render}
    run = engine.start("r = await render(1)\nr + '!'", ns, key="outside")
    call = published.get(timeout=30)
    wait_until(lambda: run.parked, what="the run parked on the external call")
    run.cancel()
    assert run.wait(10) and run.status == "interrupted"
    complete_call(engine.store, call, "done")
    assert engine.resume("outside", ns).result(30) == "done!"
    assert published.empty()  # not published again
    engine.close()
