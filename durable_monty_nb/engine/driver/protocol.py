"""The Monty side of the driver: advance the sandbox until it blocks, answering what it asks.

Name lookups are answered from the namespace, awaited calls with futures (they run
concurrently), ready results in batches; sleeps become durable timers.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from pydantic_monty import FunctionSnapshot, FutureSnapshot, NameLookupSnapshot

from ...errors import ValueCrossingError
from ...signals import SIGNAL_FUNCTION
from ..analysis import GATHER_FUNCTION
from ..fingerprint import is_local, sha256
from . import collecting, switching
from .calls import PHANTOM, CallState
from .switching import CONTENDED
from .waits import SIGNAL_ERRORS, signal_arguments

if TYPE_CHECKING:
    from .loop import Driver

RESUME_BATCH = 1000
SLEEP_FUNCTIONS = ("asyncio.sleep", "time.sleep")


class MontyProtocol:
    """Mixin of :class:`Driver`: everything that talks to the Monty session."""

    def _advance(self: Driver, snap: Any) -> Any:
        """Run Monty until it needs something that is not ready yet (or completes)."""
        while True:
            kind = type(snap)
            if kind is FunctionSnapshot:
                if snap.is_os_function:
                    next_snap = self._os_call(snap)
                    if next_snap is not None:
                        snap = next_snap
                        continue
                else:
                    call_id = self._host_id(snap.call_id)
                    if call_id not in self.calls:
                        state, answer = self._announce(snap)
                        if answer is not None:
                            snap = snap.resume(answer)
                            continue
                        if state.awaited:
                            started = perf_counter()
                            snap = snap.resume({"future": ...})
                            if perf_counter() - started > CONTENDED and not switching.lowered:
                                switching.contention_seen()  # another thread keeps the GIL from us
                            continue
                    answer = self.answers.pop(call_id, None)
                    if answer is not None:
                        snap = snap.resume(answer)
                        continue
            elif kind is FutureSnapshot:
                if self._member_of and self.answers:
                    self._route_gathered()  # batched gathers (gathers.py)
                ready = self._ready(snap) if self.answers or self._gather_answers else None
                if ready:
                    snap = snap.resume(ready)
                    continue
            elif kind is NameLookupSnapshot:
                snap = self._lookup(snap)
                continue
            else:
                return snap
            # Blocked. Calls an earlier execution of the key completed need not wait.
            if not self._reuse_pending():
                return snap

    def _reach_site(self: Driver, position: Any) -> None:
        """A call site that runs at most once was reached (for the expected total of views)."""
        if self._sites_left and position.filename.endswith("-1>"):
            self._sites_left.discard(position.start)

    def _ready(self: Driver, snap: FutureSnapshot) -> dict[int, dict[str, Any]]:
        """Up to RESUME_BATCH answers for calls the snapshot waits on (never others:
        resuming a call id that is not pending would consume the snapshot)."""
        pending = snap.pending_call_ids
        answers = self.answers
        if self._shift_at or self._gather_answers:  # Monty's ids are not the calls' (gathers.py)
            ready: dict[int, dict[str, Any]] = {}
            gathered, gathers, host = self._gather_answers, self._gathers, self._host_id
            for monty_id in pending:
                if monty_id in gathers or monty_id in gathered:
                    if monty_id in gathered:
                        ready[monty_id] = gathered.pop(monty_id)
                else:
                    answer = answers.pop(host(monty_id), None)
                    if answer is not None:
                        ready[monty_id] = answer
                if len(ready) >= RESUME_BATCH:
                    break
            return ready
        if len(answers) < len(pending):
            pending_set = set(pending)
            ids = [c for c in answers if c in pending_set]
        else:
            ids = [c for c in pending if c in answers]
        return {c: answers.pop(c) for c in ids[:RESUME_BATCH]}

    def _announce(self: Driver, snap: FunctionSnapshot) -> tuple[CallState, dict[str, Any] | None]:
        """Register a new external call. Returns an immediate answer for calls that cannot run."""
        name = snap.function_name
        if name == SIGNAL_FUNCTION:  # the driver's own: never a namespace function
            try:
                signal, timeout = signal_arguments(snap.args, snap.kwargs)
            except SIGNAL_ERRORS as exc:
                return PHANTOM, {"exc_type": "TypeError", "message": str(exc)}
            self._reach_site(snap.position)
            call_id = self._host_id(snap.call_id)
            return self.waiting.signals.wait(call_id, signal, timeout, self._awaited(snap)), None
        if name == GATHER_FUNCTION:  # a gather the analysis batched (gathers.py)
            with collecting.paused():  # thousands of objects that live as long as the run
                return self._announce_gather(snap)
        if snap.object_id is not None:  # a method of a handle: the object lives on the host
            return PHANTOM, {"exc_type": "AttributeError", "message": handle_method_message(name)}
        fn = self._function(name)
        if fn is None:
            return PHANTOM, {
                "exc_type": "NameError",
                "message": f"name {name!r} is not defined (not a function of the namespace)",
            }
        self._reach_site(snap.position)
        awaited = self._awaited(snap)
        fingerprint, is_coroutine = self._describe_function(name, fn)
        if is_coroutine:
            awaited = True
        args, kwargs = snap.args, snap.kwargs
        try:
            args_text = self.codec.encode_arguments(args, kwargs, what=f"an argument of {name}()")
        except ValueCrossingError as exc:
            return PHANTOM, {"exc_type": "TypeError", "message": str(exc)}
        state = CallState(self._host_id(snap.call_id), name, "call", args_text, awaited, fingerprint, (args, kwargs))
        classes = self._classes_of(args_text) if '"$h"' in args_text else ""
        self._register(state, call_key=sha256(f"{name}\0{fingerprint}\0{args_text}{classes}"))
        if self.reuse_key is not None and name not in self.rerun_functions:
            self._to_reuse.append(state)
        else:
            self._to_dispatch.append(state)
        return state, None

    def _awaited(self: Driver, snap: FunctionSnapshot) -> bool:
        """Is the call awaited (answered with a future) or synchronous (answered with its value)?"""
        position = snap.position
        awaited = self.info.is_awaited(position.start, position.end) if position.filename.endswith("-1>") else None
        return snap.allow_eager_await if awaited is None else awaited

    def _os_call(self: Driver, snap: FunctionSnapshot) -> Any:
        """Sleeps become durable timers; other OS calls get Monty's default behaviour."""
        name = snap.function_name
        if name not in SLEEP_FUNCTIONS:
            return snap.resume_not_handled()
        call_id = self._host_id(snap.call_id)
        state = self.calls.get(call_id)
        if state is None:
            if self._sites_left:
                self._reach_site(snap.position)
            state = self.waiting.sleeps.announce(call_id, name, snap.args, name == "asyncio.sleep")  # waits.py
            if state.awaited:
                return snap.resume({"future": ...})
        answer = self.answers.pop(call_id, None)
        return None if answer is None else snap.resume(answer)

    def _lookup(self: Driver, snap: NameLookupSnapshot) -> Any:
        name = snap.variable_name
        if snap.object_id is not None:  # an attribute of a handle: AttributeError in the sandbox
            self._refused_attribute = name  # named in the failure's hint (finishing.py)
            return snap.resume()
        if name in self.inputs:
            return snap.resume(value=self.inputs[name])
        if name not in self.namespace:
            return snap.resume()
        value = self.namespace[name]
        if is_function_like(value):
            self._callables[getattr(value, "__name__", name)] = value
            return snap.resume(value=value)
        try:
            _, sandbox_value = self.codec.encode(value, what=f"the notebook variable {name!r}")
        except ValueCrossingError:
            return snap.resume()
        self.inputs[name] = sandbox_value
        return snap.resume(value=sandbox_value)

    def _function(self: Driver, name: str) -> Callable[..., Any] | None:
        fn = self.namespace.get(name)
        if fn is None or not callable(fn):
            fn = self._callables.get(name)
        return fn

    def _describe_function(self: Driver, name: str, fn: Any) -> tuple[str, bool]:
        """(fingerprint, is a coroutine function), computed once per function of the run."""
        found = self._functions.get(name)
        if found is None:
            digest = self.fingerprinter.function(fn).digest
            found = self._functions[name] = (digest, inspect.iscoroutinefunction(fn))
        return found

    def _classes_of(self: Driver, args_text: str) -> str:
        """The code of the notebook classes of the stored objects among a call's arguments.

        An argument object counts by its pickle (its state); a method of its class edited since
        must make the call look changed too. Only the objects' own classes count (not those of
        objects held inside them).
        """
        tokens = []
        for key, type_name in _handles(json.loads(args_text)):
            token = self._argument_classes.get(type_name)
            if token is None:
                obj = self.codec.objects.get(key)
                cls = type(obj) if obj is not None else self._class_named(type_name)
                token = self.fingerprinter.class_token(cls) if cls is not None and is_local(cls) else ""
                self._argument_classes[type_name] = token
            if token:
                tokens.append(token)
        return "\0classes:" + ",".join(sorted(set(tokens))) if tokens else ""

    def _class_named(self: Driver, type_name: str) -> type | None:
        """A class of the namespace (or an imported module) with this ``module.qualname``."""
        for value in self.namespace.values():
            if isinstance(value, type) and f"{value.__module__}.{value.__qualname__}" == type_name:
                return value
        module, _, qualname = type_name.rpartition(".")
        found: Any = sys.modules.get(module)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        return found if isinstance(found, type) else None


def _handles(tree: Any) -> list[tuple[str, str]]:
    """(blob key, type name) of every stored object in a tagged JSON tree."""
    found: list[tuple[str, str]] = []
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if "$h" in item:
                found.append((item["$h"], item.get("t", "")))
            else:
                stack.extend(item.values())
    return found


def is_function_like(value: Any) -> bool:
    """Functions, classes and partials are called as external functions; anything else is data."""
    return inspect.isroutine(value) or inspect.isclass(value) or isinstance(value, functools.partial)


def handle_method_message(name: str, method: bool = True) -> str:
    """What workflow code is told when it reaches into an object held by reference (a DataFrame)."""
    what, use = (f"{name}() is a method", f"obj.{name}()") if method else (f".{name} is an attribute", f"obj.{name}")
    return (
        f"{what} of an object held by reference: the workflow holds a DataFrame, an array or any "
        f"object that is not plain data as a handle, and the object itself lives in the notebook. Use "
        f"it in a notebook function (def {name}_of(obj): return {use}) called from the workflow, or "
        f"after the cell, where the name holds the real object."
    )
