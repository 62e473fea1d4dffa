"""A real Jupyter kernel driven through jupyter_client, for tests of the notebook face."""

from __future__ import annotations

import os
import queue
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class Reply:
    """What one executed cell produced."""

    status: str = ""
    streams: str = ""
    result: str | None = None
    displays: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str = ""
    widget_text: list[str] = field(default_factory=list)  # string traits sent to widget views


class Kernel:
    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(cwd), env={**os.environ, **env})
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return self.manager.provisioner.process.pid  # type: ignore[union-attr]

    def submit(self, code: str) -> str:
        # Each cell is its own request: with stop_on_error (jupyter_client's default) ipykernel
        # aborts, silently, a request that arrives while it still handles the previous cell's error.
        return self.client.execute(code, allow_stdin=False, stop_on_error=False)

    def collect(self, msg_id: str, timeout: float = 120) -> Reply:
        reply = Reply()
        while True:
            msg = _next(self.client.get_iopub_msg, timeout, "no answer from the kernel")
            content = msg["content"]
            kind = msg["msg_type"]
            if kind in ("comm_msg", "comm_open"):
                _widget_strings(content.get("data", {}).get("state", {}), reply.widget_text)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if kind == "stream":
                reply.streams += content["text"]
            elif kind == "execute_result":
                reply.result = content["data"].get("text/plain")
            elif kind == "display_data":
                reply.displays.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                reply.error = content["ename"]
                reply.traceback = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                reply.status = self._reply_status(msg_id, timeout)
                assert reply.status != "aborted", f"the kernel aborted the cell without running it: {reply}"
                return reply

    def _reply_status(self, msg_id: str, timeout: float) -> str:
        """The execute_reply's status (ok, error, aborted); replies to cells not collected are skipped."""
        while True:
            msg = _next(self.client.get_shell_msg, timeout, "no execute_reply from the kernel")
            if msg["parent_header"].get("msg_id") == msg_id:
                return str(msg["content"]["status"])

    def run(self, code: str, timeout: float = 120) -> Reply:
        return self.collect(self.submit(code), timeout)

    def ok(self, code: str, timeout: float = 120) -> Reply:
        reply = self.run(code, timeout)
        assert reply.error is None, f"{reply.error}\n{reply.traceback}"
        return reply

    def kill(self) -> None:
        """SIGKILL the kernel process, as a crash or the OOM killer would."""
        os.kill(self.pid, signal.SIGKILL)
        self.manager.provisioner.process.wait()  # type: ignore[union-attr]
        self.close()

    def close(self) -> None:
        self.client.stop_channels()
        if self.manager.is_alive():
            self.manager.shutdown_kernel(now=True)
        self.manager.cleanup_resources()


def _next(get: Any, timeout: float, missing: str) -> dict[str, Any]:
    """The next message of a channel (``get_iopub_msg``, ``get_shell_msg``); fails the test when none comes."""
    try:
        return get(timeout=timeout)
    except queue.Empty as exc:
        raise AssertionError(f"{missing} within {timeout} s") from exc


def _widget_strings(state: dict[str, Any], into: list[str]) -> None:
    into.extend(value for value in state.values() if isinstance(value, str))


def dask_config(address: str) -> str:
    """The cell that points a kernel's %%durable at a Dask scheduler."""
    return f"%config DurableMagics.executor = 'dask'\n%config DurableMagics.dask_address = {address!r}"


def rq_config(url: str, queue: str) -> str:
    """The cell that points a kernel's %%durable at RQ workers on ``queue``."""
    return (
        f"%config DurableMagics.executor = 'rq'\n%config DurableMagics.rq_url = {url!r}\n"
        f"%config DurableMagics.rq_queue = {queue!r}"
    )
