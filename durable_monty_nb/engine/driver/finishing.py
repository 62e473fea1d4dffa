"""The end of an execution: its result and exported names, or its failure, committed last."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pydantic_monty import MontyComplete, MontyError, MontyRuntimeError

from ...errors import ValueCrossingError, WorkflowFailed
from ...executors.base import exception_message
from ..events import ExecutionFinished
from . import collecting
from .exceptions import format_monty_error
from .protocol import handle_method_message

if TYPE_CHECKING:
    from .loop import Driver


class Finishing:
    """Mixin of :class:`Driver`: completion, failure and the final commit."""

    def _complete(self: Driver, snap: MontyComplete) -> None:
        with collecting.paused():  # a gather's results, read and encoded (collecting.py)
            output = snap.output
            exports = self._read_exports()
            result_text = self._encode_final(output, "the result of the workflow")
            outputs_text, outputs = self._encode_exports(exports)
            result_host = self.codec.to_host(output)  # loads (and verifies) stored objects first
            outputs_host = {k: self.codec.to_host(v) for k, v in outputs.items()}
        now = self.clock.now()
        self.step.execution.update(
            status="completed",
            result=result_text,
            outputs=outputs_text,
            result_sig=self.store.sign_execution_result(self.execution_id, result_text, outputs_text),
            finished_at=now,
            error=None,
            error_type=None,
        )
        self._commit_final()
        self._finish_run("completed", result=result_host, outputs=outputs_host, commit=False, finished_at=now)

    def _encode_exports(self: Driver, exports: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Stored text of the exported names, leaving out objects of sandbox-defined classes."""
        try:
            return self.codec.encode_text(exports), exports
        except ValueCrossingError:
            pass
        kept = {}
        for name, value in exports.items():
            with contextlib.suppress(ValueCrossingError):  # they cannot leave the sandbox
                self.codec.encode_text(value, what=f"the variable {name!r}")
                kept[name] = value
        return self.codec.encode_text(kept), kept

    def _encode_final(self: Driver, value: Any, what: str) -> str | None:
        try:
            return self.codec.encode_text(value, what=what)
        except ValueCrossingError:
            return None

    def _read_exports(self: Driver) -> dict[str, Any]:
        names = self.info.exports
        if not names:
            return {}
        lines = ["__dm_exports = {}"]
        for name in names:
            lines += ["try:", f"    __dm_exports[{name!r}] = {name}", "except NameError:", "    pass"]
        lines.append("__dm_exports")
        try:
            exported = self.session.feed_run("\n".join(lines))
        except MontyError:
            return {}
        return exported if isinstance(exported, dict) else {}

    def _fail(self: Driver, exc: MontyRuntimeError) -> None:
        inner = exc.exception()
        error_type = type(inner).__name__
        cause = self.book.failed_by_error.get((error_type, exception_message(inner)))
        from_call = cause is not None and bool(cause.error_text)
        text = format_monty_error(exc, self.key, sandbox_hint=not from_call, sources=(self.info.code, self.info.fed))
        refused = getattr(self, "_refused_attribute", None)
        if isinstance(inner, AttributeError) and refused is not None and not from_call:
            text += "\n" + handle_method_message(refused, method=False)
        if from_call:
            assert cause is not None
            text += (
                f"\n\nThe exception came from call {cause.call_id}, {cause.function}({cause.view().args}), "
                f"after {cause.attempts} attempt(s)"
                f"{f' on worker {cause.worker}' if cause.worker else ''}:\n{cause.error_text}"
            )
            if cause.worker and isinstance(inner, ModuleNotFoundError):
                text += (
                    f"\nThe module is missing where the call ran, on worker {cause.worker}. Install it in the "
                    "workers' environment (for a module of your own: cloudpickle.register_pickle_by_value(module) "
                    "in the notebook ships it with the function), then run the cell again: only the failed calls run."
                )
        summary = f"{error_type}: {exception_message(inner)}"
        self._record_failure(text, error_type, WorkflowFailed(summary, text, self.execution_id, error_type))

    def _record_failure(self: Driver, text: str, error_type: str, error: BaseException) -> None:
        now = self.clock.now()
        self.step.execution.update(status="failed", error=text, error_type=error_type, finished_at=now)
        with contextlib.suppress(Exception):  # the store is unreachable: the handle still reports the failure
            self._commit_final()
        self._finish_run("failed", error=error, commit=False, finished_at=now)

    def _finish_run(
        self: Driver,
        status: str,
        *,
        result: Any = None,
        outputs: dict[str, Any] | None = None,
        error: BaseException | None = None,
        commit: bool = True,
        finished_at: float | None = None,
    ) -> None:
        if commit:
            self.step.execution.update(status=status)
            with contextlib.suppress(Exception):
                self._commit_final()
        with self._state_lock:
            self._finished = True
        self._end_switching()
        self.run._finish(
            status, result=result, outputs=outputs, error=error, progress=self.progress(), finished_at=finished_at
        )
        self.run.events.emit(
            ExecutionFinished(self.execution_id, status, None if error is None else str(error).splitlines()[-1])
        )
