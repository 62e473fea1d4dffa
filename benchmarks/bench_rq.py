"""Durable calls on RQ workers against the same jobs on plain RQ, on the same workers.

    python benchmarks/bench_rq.py                       # 1,000 calls of 10 ms, both worker kinds
    python benchmarks/bench_rq.py -n 200 --repeat 2 --worker plain

Starts its own workers (``--workers``, default 2) on a Redis database of its own (``--redis-db``,
flushed at start) and a fresh SQLite store in a temporary folder, for each worker kind:

- ``plain``: ``rq worker QUEUE --url URL`` (forks a horse per job, which imports the job's
  module each time);
- ``preloaded``: ``durable-monty-nb worker QUEUE --url URL`` (durable-monty-nb imported once,
  before jobs fork).

Per kind, runs alternate between the two modes:

- ``durable``: ``await gather(*[work(i, seconds) for i in range(n)])`` through
  ``Engine(db, executor=RQ(url, queue)).run(...)``;
- ``plain``: ``Queue.enqueue_many`` of ``bench_rq.sleep_job(i, seconds)`` (this module, which
  the workers import), timed from the first enqueue to the last finished job.

Figures, not assertions. The workers import this file as ``bench_rq``: keep its top level light.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
QUEUE = "bench-rq"
POLL = 0.02
CHUNK = 64  # jobs whose status one poll fetches at most, oldest first

GATHER = "results = await gather(*[work(i, seconds) for i in range(n)])\nsum(results)"


def sleep_job(i: int, seconds: float) -> int:
    """The plain RQ job (imported by the workers as ``bench_rq.sleep_job``)."""
    time.sleep(seconds)
    return i * 2


def work(i: int, seconds: float) -> int:
    """The durable call (shipped by value with cloudpickle when this file runs as a script)."""
    time.sleep(seconds)
    return i * 2


# -- workers -------------------------------------------------------------------------------------


class WorkerSet:
    """``count`` worker processes of one kind, each in its own process group (horses included)."""

    def __init__(self, kind: str, count: int, url: str, queue: str, logs: Path) -> None:
        self.kind, self.count, self.url, self.queue, self.logs = kind, count, url, queue, logs
        self.names = [f"bench-{kind}-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def command(self, name: str) -> list[str]:
        if self.kind == "plain":
            return [str(BIN / "rq"), "worker", self.queue, "--url", self.url, "--name", name]
        return [str(BIN / "durable-monty-nb"), "worker", self.queue, "--url", self.url, "--name", name]

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, redis: Any, store: str, timeout: float = 30.0) -> None:
        env = dict(os.environ, DURABLE_MONTY_DB=store)  # the store the workers serve, as a user sets it
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(ROOT), env.get("PYTHONPATH")]))
        for name in self.names:
            with open(self.log(name), "wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        self.command(name),
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        from rq import Queue, Worker

        queue = Queue(self.queue, connection=redis)
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in zip(self.names, self.procs, strict=True):
                if proc.poll() is not None:
                    raise WorkersUnavailable(
                        f"{self.kind} worker {name} exited with code {proc.returncode}:\n{self.tail(name)}"
                    )
            registered = {worker.name for worker in Worker.all(connection=redis, queue=queue)}
            if registered >= set(self.names):
                return
            if time.monotonic() > deadline:
                raise WorkersUnavailable(f"{self.kind} workers did not register within {timeout:.0f} s")
            time.sleep(0.1)

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            text = self.log(name).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def tails(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.tail(name)}" for name in self.names)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with _suppress_gone():
                    os.killpg(proc.pid, signal.SIGTERM)  # warm shutdown: unregisters from Redis
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with _suppress_gone():
                os.killpg(proc.pid, signal.SIGKILL)  # the group: a horse left behind, if any
            proc.wait()


def _suppress_gone() -> contextlib.suppress:
    return contextlib.suppress(ProcessLookupError, PermissionError)


class WorkersUnavailable(RuntimeError):
    """The workers of a kind did not start (or exited before registering)."""


# -- the two modes -------------------------------------------------------------------------------


def durable_run(engine: Any, backend: Any, n: int, seconds: float, key: str, timeout: float) -> float:
    namespace = {"work": work, "n": n, "seconds": seconds}
    start = time.perf_counter()
    handle = engine.start(GATHER, namespace, key=key, executor=backend)
    if not handle.wait(timeout):
        progress = handle.progress
        handle.cancel()
        raise TimeoutError(
            f"durable run {key} did not finish within {timeout:.0f} s: {progress.done} of {progress.total} "
            f"calls done, {progress.failed} failed"
        )
    elapsed = time.perf_counter() - start
    total = handle.result()
    if total != n * (n - 1):
        raise AssertionError(f"durable run {key}: sum of results {total}, expected {n * (n - 1)}")
    return elapsed


def plain_run(redis: Any, queue_name: str, n: int, seconds: float, timeout: float) -> float:
    from rq import Queue
    from rq.job import Job

    queue = Queue(queue_name, connection=redis)
    data = [
        Queue.prepare_data("bench_rq.sleep_job", args=(i, seconds), timeout=-1, result_ttl=60, failure_ttl=3600)
        for i in range(n)
    ]
    start = time.perf_counter()
    jobs = queue.enqueue_many(data)
    pending = [job.id for job in jobs]
    deadline = time.monotonic() + timeout
    while pending:
        time.sleep(POLL)
        # Jobs start roughly in order: fetch the oldest pending ones, and go on while they are done.
        while pending:
            chunk = pending[:CHUNK]
            fetched = Job.fetch_many(chunk, connection=redis)
            still = []
            for job_id, job in zip(chunk, fetched, strict=True):
                status = job.get_status(refresh=False) if job is not None else None
                if status == "failed":
                    raise RuntimeError(f"plain job {job_id} failed:\n{job.latest_result().exc_string}")
                if status != "finished":
                    still.append(job_id)
            pending = still + pending[CHUNK:]
            if still:
                break
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"plain run: {len(pending)} of {n} jobs unfinished after {timeout:.0f} s")
    return time.perf_counter() - start


# -- main ----------------------------------------------------------------------------------------


def bench_kind(kind: str, args: argparse.Namespace, url: str, redis: Any, folder: Path) -> dict[str, list[float]]:
    from durable_monty_nb import Engine
    from durable_monty_nb.executors.rq import RQ

    backend = RQ(url, QUEUE)
    workers = WorkerSet(kind, args.workers, url, QUEUE, folder)
    times: dict[str, list[float]] = {"durable": [], "plain": []}
    engine = Engine(folder / f"bench-{kind}.db", executor=backend)
    try:
        workers.start(redis, engine.store.url)
        try:
            # Warm-up (not timed): the store's schema, the first jobs on each worker.
            durable_run(engine, backend, 2 * args.workers, 0.0, f"{kind}-warm-up", args.timeout)
            plain_run(redis, QUEUE, 2 * args.workers, 0.0, args.timeout)
            for r in range(args.repeat):
                for mode in ("durable", "plain") if r % 2 == 0 else ("plain", "durable"):
                    if mode == "durable":
                        elapsed = durable_run(engine, backend, args.n, args.sleep, f"{kind}-{r}", args.timeout)
                    else:
                        elapsed = plain_run(redis, QUEUE, args.n, args.sleep, args.timeout)
                    times[mode].append(elapsed)
                    print(f"  {kind:<10} run {r + 1}/{args.repeat} {mode:<8} {elapsed:8.3f} s", flush=True)
        finally:
            engine.close()
    except BaseException:
        print(f"worker logs ({kind}):\n{workers.tails()}", file=sys.stderr, flush=True)
        raise
    finally:
        workers.stop()
    return times


def report(kind: str, times: dict[str, list[float]], args: argparse.Namespace) -> None:
    n = args.n
    durable, plain = times["durable"], times["plain"]
    ideal = n * args.sleep / args.workers
    print(f"\n{kind} workers ({args.workers}), {n} calls of {args.sleep * 1000:g} ms (ideal {ideal:.2f} s):")
    print(f"  {'mode':<8} {'min (s)':>9} {'median (s)':>11} {'ms/call (median)':>17}")
    for mode, values in (("durable", durable), ("plain", plain)):
        median = statistics.median(values)
        print(f"  {mode:<8} {min(values):>9.3f} {median:>11.3f} {median / n * 1000:>17.2f}")
    print(
        f"  ratio durable/plain: {min(durable) / min(plain):.2f}x (min), "
        f"{statistics.median(durable) / statistics.median(plain):.2f}x (median)"
    )
    extra = (statistics.median(durable) - statistics.median(plain)) / n * 1000
    print(
        f"  durable overhead per call (median): {extra:.2f} ms of wall time, "
        f"~{extra * args.workers:.2f} ms of worker time ({args.workers} workers in parallel)"
    )
    for mode, values in (("durable", durable), ("plain", plain)):
        beyond = (statistics.median(values) - ideal) / n * 1000 * args.workers
        print(f"  {mode:<8} cost per call beyond the sleep: ~{beyond:.2f} ms of worker time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="calls per run (default 1000)")
    parser.add_argument("--sleep", type=float, default=0.01, help="seconds each call sleeps (default 0.01)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode, interleaved (default 3)")
    parser.add_argument("--worker", choices=("plain", "preloaded", "both"), default="both")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database, flushed at start (default 13)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (without the database)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take before it fails")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DURABLE_MONTY_KEY", "benchmark")  # the workers inherit it
    from redis import Redis

    url = f"{args.redis.rstrip('/')}/{args.redis_db}"
    redis = Redis.from_url(url)
    redis.flushdb()
    kinds = ["plain", "preloaded"] if args.worker == "both" else [args.worker]
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rq-") as tmp:
        for kind in kinds:
            print(f"{kind} workers: {' '.join(WorkerSet(kind, 1, url, QUEUE, Path(tmp)).command('NAME'))}", flush=True)
            try:
                results[kind] = bench_kind(kind, args, url, redis, Path(tmp))
            except WorkersUnavailable as exc:
                if kind != "preloaded":
                    raise
                print(f"preloaded workers unavailable, skipped: {exc}", flush=True)
    for kind, times in results.items():
        report(kind, times, args)


if __name__ == "__main__":
    main()
