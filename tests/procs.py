"""Helpers for tests that run workflows in subprocesses and kill them."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (for a server or scheduler a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(
    db_url: str, scenario: str, log: Path, *, mode: str = "run", block: str = "", env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    full_env = {**os.environ, "SIDE_LOG": str(log), "BLOCK": block, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), full_env.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, str(TESTS / "proc_runner.py"), db_url, scenario, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 60.0,
    what: str = "condition",
    procs: tuple[subprocess.Popen[str], ...] = (),
) -> Any:
    """Poll ``predicate`` until it is truthy; fail early if a watched process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def log_entries(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    entries = []
    for line in log.read_text().splitlines():
        pid, _, entry = line.partition(" ")
        entries.append((int(pid), entry))
    return entries


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=30)


# Random-moment fuzzes draw from this seed: a new one each session (more moments over time), or
# DURABLE_TEST_SEED to replay one. Each fuzz prints its seed, which pytest shows when it fails.
SESSION_SEED = int(os.environ.get("DURABLE_TEST_SEED") or random.SystemRandom().randrange(1 << 30))


def fuzz_random(index: int) -> random.Random:
    """The random source of run ``index`` of a fuzz, its seed printed (shown on failure)."""
    seed = SESSION_SEED + index
    print(f"random moment from seed {seed} (replay: DURABLE_TEST_SEED={SESSION_SEED})", flush=True)
    return random.Random(seed)
