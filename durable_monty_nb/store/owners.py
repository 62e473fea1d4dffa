"""Lease owners and their liveness: who drives an execution, and whether that process still runs.

An owner id names the machine (hostname and boot id), the process (pid and start time) and a
unique part. On the owner's own machine a dead process (or a reused pid) is seen at once, so a
resume takes over without waiting for the lease to lapse; in the owner's own process, an owner
is live from :func:`new_owner` until :func:`release_owner`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

_BOOT_ID: str | None = None


def machine_id() -> str:
    """This machine (hostname plus boot id): owners on it can be checked for liveness."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            _BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        except OSError:
            _BOOT_ID = "-"
    return f"{socket.gethostname()}/{_BOOT_ID}"


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first); [] when unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_start(pid: int) -> str:
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else "-"


_LIVE: set[str] = set()
"""Owners of this process still in use (drivers running); the others of this process are over."""
_LIVE_LOCK = threading.Lock()


def new_owner() -> str:
    """A lease owner id: machine, pid, process start time, and a unique part."""
    pid = os.getpid()
    owner = f"{machine_id()}:{pid}:{_process_start(pid)}:{uuid.uuid4().hex[:12]}"
    with _LIVE_LOCK:
        _LIVE.add(owner)  # until release_owner(owner), when its driver ends
    return owner


def release_owner(owner: str) -> None:
    """The driver of ``owner`` ended: a lease it still holds is a dead owner's (taken over at once)."""
    with _LIVE_LOCK:
        _LIVE.discard(owner)


def owner_is_dead(owner: str) -> bool:
    """True when ``owner`` is a process of this machine that no longer runs, or a driver of
    this process that ended without releasing its lease (the store was unreachable)."""
    try:
        machine, pid_text, started, _ = owner.rsplit(":", 3)
        pid = int(pid_text)
    except ValueError:
        return False
    if machine != machine_id():
        return False
    if pid == os.getpid() and started == _process_start(pid):
        return owner not in _LIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: dead all the same
        return True
    return started != "-" and (fields[19] if len(fields) > 19 else "-") != started


def lease_held(row: Any) -> bool:
    """Whether a live process holds the lease of this execution row right now."""
    owner = row.lease_owner
    return bool(owner) and (row.lease_expires_at or 0) >= time.time() and not owner_is_dead(owner)


def execution_state(row: Any) -> str:
    """The status, with ``crashed`` for a running execution whose owner is gone."""
    return "crashed" if row.status == "running" and not lease_held(row) else row.status


def describe_owner(owner: str | None) -> str:
    if not owner:
        return "nobody"
    try:
        machine, pid, _, _ = owner.rsplit(":", 3)
    except ValueError:
        return owner
    return f"process {pid} on {machine.split('/')[0]}"
