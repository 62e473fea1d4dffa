"""What a run reads from its namespace: the names it needs (checked before anything runs), the
sandbox values and fingerprints of those it reads, and its functions shipped by value; and the
row a new execution records of its code and fingerprints."""

from __future__ import annotations

import contextlib
import difflib
import json
import types
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import UnknownNamesError, ValueCrossingError
from ..store.store import UNFINISHED, Store
from ..values import ValueCodec, ship_function
from . import sandbox
from .analysis import MONTY_MISSING_BUILTINS, SANDBOX_NAMES, CodeInfo, sandbox_substitute
from .driver import is_function_like
from .fingerprint import Fingerprinter, Unhashable, sha256


def ship_functions(info: CodeInfo, namespace: Mapping[str, Any], fingerprints: dict[str, Any]) -> dict[str, Any]:
    """{name: (key, fingerprint, pickle)} of the functions the code reads, for remote workers.

    Raises ValueCrossingError naming a function that cannot be shipped, before anything runs.
    """
    shipped = {}
    for name, fingerprint in fingerprints["functions"].items():
        if name not in namespace:
            continue
        key, data = ship_function(namespace[name], name)
        shipped[name] = (key, fingerprint, data)
    return shipped


def check_names(info: CodeInfo, namespace: Mapping[str, Any], unfinished: Any) -> None:
    """Raise UnknownNamesError, before anything runs, for names neither namespace nor sandbox has."""
    missing = {name: line for name, line in info.free_names.items() if name not in namespace}
    if missing:
        unavailable = {name: sandbox_substitute(name) for name in missing if name in MONTY_MISSING_BUILTINS}
        raise UnknownNamesError(
            missing,
            resumable=_describe_unfinished(unfinished),
            unavailable=unavailable,
            suggestions=close_names(missing, namespace),
        )


def close_names(unknown: Iterable[str], namespace: Mapping[str, Any]) -> dict[str, str]:
    """For each unknown name, the closest name the notebook or the sandbox defines (``lod`` ->
    ``load``), when one is close enough."""
    defined = [n for n in namespace if isinstance(n, str) and not n.startswith("_")]
    defined += sorted(SANDBOX_NAMES)
    found = {}
    for name in unknown:
        match = difflib.get_close_matches(name, defined, n=1, cutoff=0.7)
        if match:
            found[name] = match[0]
    return found


def prepare_inputs(
    info: CodeInfo, namespace: Mapping[str, Any], codec: ValueCodec, fingerprinter: Fingerprinter | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sandbox values of the namespace names the code reads, and fingerprints of all of them.

    ``{"reads": {name: digest}, "functions": {name: digest}, "parts": {function: {part: digest}},
    "unhashable": {function: {part: type}}}``: the parts (see :class:`.fingerprint.FunctionPrint`)
    say what changed when a digest differs. Raises ValueCrossingError, before anything runs, for
    a value that cannot cross.
    """
    printer = fingerprinter or Fingerprinter()
    inputs: dict[str, Any] = {}
    reads: dict[str, str] = {}
    functions: dict[str, str] = {}
    parts: dict[str, dict[str, str]] = {}
    unhashable: dict[str, dict[str, str]] = {}
    for name in sorted(info.free_names):
        value = namespace[name]
        if is_function_like(value):
            printed = printer.function(value)
            functions[name] = printed.digest
            parts[name] = printed.parts
            if printed.unhashable:
                unhashable[name] = printed.unhashable
            continue
        if isinstance(value, types.ModuleType):
            raise ValueCrossingError(
                f"{name!r} (line {info.free_names[name]}) is a module; workflow code cannot use host modules. "
                f"Call a notebook function that uses {name} instead."
            )
        text, sandbox_value = codec.encode(value, what=f"the notebook variable {name!r} (line {info.free_names[name]})")
        inputs[name] = sandbox_value
        reads[name] = sha256(text)
        if '"$h"' in text:  # a stored object (a blob) also counts by the code of the notebook classes it holds
            with contextlib.suppress(Unhashable):
                reads[name] = printer.value(value)
    return inputs, {"reads": reads, "functions": functions, "parts": parts, "unhashable": unhashable}


def _stored_prints(stored: str | None) -> dict[str, Any] | None:
    if not stored:
        return None
    try:
        found = json.loads(stored)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _same_fingerprints(stored: str | None, current: dict[str, Any]) -> bool:
    """The same values read and the same function fingerprints (what explains them aside)."""
    found = _stored_prints(stored)
    return (
        found is not None
        and found.get("reads") == current["reads"]
        and found.get("functions") == current["functions"]
        and not current["unhashable"]
    )


def _same_reads(stored: str | None, current: dict[str, Any]) -> bool:
    found = _stored_prints(stored)
    return found is not None and found.get("reads") == current["reads"]


def _describe_unfinished(row: Any) -> str | None:
    if row is None or row.status not in UNFINISHED:
        return None
    return (
        f"execution {row.id[:12]} has {row.calls_done} of {row.calls_total} calls done and "
        f"continues from there when you run it again."
    )


def execution_values(
    store: Store, execution_id: str, key: str, info: CodeInfo, fingerprints: dict[str, Any], previous: Any
) -> dict[str, Any]:
    """The row of a new execution of ``key`` (its code signed, the Monty version and the gather
    rewrite its checkpoints will need), after ``previous``, the latest of the key or None."""
    return {
        "id": execution_id,
        "key": key,
        "status": "running",
        "code": info.code,
        "code_hash": info.code_hash,
        "code_sig": store.signer.sign_text(f"code:{execution_id}", info.code),
        "monty_version": sandbox.MONTY_VERSION,
        "batching": info.batching,
        "fingerprints": json.dumps(fingerprints, sort_keys=True),
        "previous_id": previous.id if previous is not None else None,
    }
